"""@triton.jit building blocks the kernels share (inlined into each kernel by Triton).

Every index that multiplies a stride is int64 (`indices`): (M − 1)·stride reaches 2³¹ at
M ≈ 195k rows of a 4096→11008 layer, 16.7k rows of a 128k-vocabulary head, or a handful of
rows of a strided view, and an int32 product would wrap into other memory. compile_check
fails on any pointer offset computed in 32 bits.
"""
import triton
import triton.language as tl


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, visiting the (M, N) tiles in groups of GROUP_M rows so
    neighbouring programs share W tiles in L2."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % group_size
    pid_n = (pid % (GROUP_M * n_n)) // group_size
    return pid_m, pid_n


@triton.jit
def indices(start, BLOCK: tl.constexpr):
    """start + [0, BLOCK) as int64, ready to multiply by a stride."""
    return start.to(tl.int64) + tl.arange(0, BLOCK).to(tl.int64)


@triton.jit
def dropout_kept(SEED, rows, col0, N, P, BLOCK_COLS: tl.constexpr):
    """Adapter dropout's mask for the tile (rows, col0 + [0, BLOCK_COLS)) of an (M, N) input:
    True where the element is kept, each with probability 1 − P. A pure function of (SEED,
    row, col), so the forward and the backward, whatever their tiles, draw the same mask and
    none is ever stored: Philox4x32-10 on the counter row·⌈N/4⌉ + ⌊col/4⌋ (int64; rows int64)
    gives four uniforms, one for each col mod 4 (one Philox per four elements, and a quarter
    of the live state: per-element Philox over a 128×128 tile spilled 1–5 KB/thread on
    sm_90). col0 must be a multiple of 4 (tile starts are multiples of BLOCK ≥ 16)."""
    quads = col0 // 4 + tl.arange(0, BLOCK_COLS // 4).to(tl.int64)
    u0, u1, u2, u3 = tl.rand4x(SEED, rows[:, None] * ((N + 3) // 4) + quads[None, :])
    # (rows, quads, i, j) → column 4·quad + 2i + j, row-major as reshape reads it.
    u = tl.join(tl.join(u0, u2), tl.join(u1, u3))
    return tl.reshape(u, (rows.shape[0], BLOCK_COLS)) >= P


@triton.jit
def x_at_tile(X, A, rows, ranks, M, K, R, stride_xm, stride_xk, stride_ar, stride_ak,
              SEED, P, DROPOUT: tl.constexpr,
              DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
              BLOCK_R: tl.constexpr):
    """t = x[rows]·a[ranks]ᵀ over the whole K, fp32 (BLOCK_M, BLOCK_R); rows and ranks int64.
    a is normally in x's dtype already (the launchers convert it once, as_operand).
    DROPOUT: t = dropout(x)·aᵀ, the x tiles masked by dropout_kept (an (M, K) input) and t
    scaled by 1/(1 − P) once, in fp32, after the loop."""
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    row_ok = rows < M
    rank_ok = ranks < R
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        x = tl.load(X + rows[:, None] * stride_xm + (k0 + ks)[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if DROPOUT:
            x = tl.where(dropout_kept(SEED, rows, k0, K, P, BLOCK_K), x, tl.zeros_like(x))
        # aᵀ tile (BLOCK_K, BLOCK_R); tl.dot wants one dtype, the activations' one (a no-op
        # conversion when the launcher already converted a).
        a_t = tl.load(A + ranks[None, :] * stride_ar + (k0 + ks)[:, None] * stride_ak,
                      mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
        t = tl.dot(x, a_t.to(x.dtype), t, input_precision=DOT_PRECISION)
    if DROPOUT:
        t = t * (1.0 / (1.0 - P))
    return t


@triton.jit
def xw_and_xa_tiles(acc, X, W, A, rows, cols, ranks, M, N, K, R,
                    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
                    SEED, P, DROPOUT: tl.constexpr, WITH_XA: tl.constexpr,
                    DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    """One K loop: acc += x[rows]·W[cols]ᵀ (acc fp32 (BLOCK_M, BLOCK_N), zeros or a term to
    add) and, when WITH_XA, t = x[rows]·a[ranks]ᵀ from the same x tiles (the one-pass
    strategy: x is read once). Both fp32; indices int64.
    DROPOUT: t = dropout(x)·aᵀ as in x_at_tile; x·Wᵀ still reads the unmasked tile."""
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < N
    rank_ok = ranks < R
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        x = tl.load(X + rows[:, None] * stride_xm + (k0 + ks)[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(W + cols[None, :] * stride_wn + (k0 + ks)[:, None] * stride_wk,
                      mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x, w_t, acc, input_precision=DOT_PRECISION)
        if WITH_XA:
            a_t = tl.load(A + ranks[None, :] * stride_ar + (k0 + ks)[:, None] * stride_ak,
                          mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
            xa = x
            if DROPOUT:
                xa = tl.where(dropout_kept(SEED, rows, k0, K, P, BLOCK_K), x, tl.zeros_like(x))
            t = tl.dot(xa, a_t.to(x.dtype), t, input_precision=DOT_PRECISION)
    if DROPOUT:
        t = t * (1.0 / (1.0 - P))
    return acc, t
