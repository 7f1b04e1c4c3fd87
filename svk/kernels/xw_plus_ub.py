"""The base GEMM with the adapter folded in: y = x·Wᵀ + u·vᵀ + bias, y written once.

x is (M, K), W is read as (N, K) and v as (N, R) through strides, so the same kernel computes
the forward (x, W, u, b_eff) and the backward's dx = dy·W + dt·a (W and a read transposed).
The low-rank term is R extra steps of the K loop on the same accumulator: no (M, N)
intermediate exists.

One-pass variant (ONE_PASS): instead of reading a precomputed u, every program also
accumulates t = x·aᵀ for its rows from the x tiles it already loads for x·Wᵀ, applies the
r-sized epilogue u = (t ⊙ s)·coreᵀ after the loop and adds u·vᵀ before the single store. x is
read once and there is one launch; each N-tile recomputes t (R/BLOCK_N extra FLOPs). The
programs of the first N-tile also store t for the backward.

Adapter dropout (DROPOUT), the mask drawn from (seed, row, col) by Philox in registers
(_tiles.dropout_kept), never stored: in one pass t = dropout(x)·aᵀ from the masked x tile
while x·Wᵀ reads the tile as loaded (x is still read once); in the backward's
dx = dy·W + keep ⊙ (dt·a)/(1 − p) the r steps run first and are masked by the same
(row, col) mask (the output's columns are the input features), then the K loop adds dy·W.
"""
import torch
import triton
import triton.language as tl

from svk.kernels import _tuning
from svk.kernels._common import (EPILOGUE_PRECISION, LAUNCHES, MAX_EPILOGUE_RANK,
                                 adapter_copy_bytes, as_operand, check_device, configs,
                                 core_epilogue_bytes, dot_precision, m_bucket,
                                 prune_by_shared_memory, rank_pad)
from svk.kernels._tiles import dropout_kept, grouped_tile, indices, xw_and_xa_tiles

_EPILOGUE = tl.constexpr(EPILOGUE_PRECISION)

_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                  num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
        (64, 256, 64, 4, 4), (64, 128, 64, 4, 4), (32, 128, 64, 4, 4), (16, 128, 128, 4, 4),
        (16, 64, 128, 4, 5), (64, 64, 64, 4, 5),
    ]
]
_CONFIGS = configs(_GPU_CONFIGS, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2})


def _stage_bytes(a):
    """One K step loads an x tile, a W tile and, in one pass, an a tile; the fused variant's
    rank loop is pipelined too, with a u tile (fp32) and a b tile per step. Its buffers are
    allocated apart from the K loop's: sm_90 compiles at r = 64 needed the larger of the two
    loops, not their sum (compile_check)."""
    k_step = a["BLOCK_K"] * (a["BLOCK_M"] * a["X"].element_size()
                             + a["BLOCK_N"] * a["W"].element_size()
                             + (a["BLOCK_R"] * a["A"].element_size()
                                if a.get("ONE_PASS", True) else 0))
    if a.get("ONE_PASS", True) or not a.get("HAS_LOWRANK", False):
        return k_step
    r_step = a["BLOCK_R"] * (a["BLOCK_M"] * a["U"].element_size()
                             + a["BLOCK_N"] * a["V"].element_size())
    return max(k_step, r_step)


XW_XA_STAGE_BYTES = prune_by_shared_memory(
    _stage_bytes, lambda a: adapter_copy_bytes(a) if a.get("ONE_PASS", True) else 0,
    core_epilogue_bytes)


def _prune(configs_, args, **kwargs):
    """The dispatcher picks one pass for decode-sized M (its cut-off), where 128- and 256-row
    tiles leave most of the GPU idle, and with the r-sized epilogue they spilled 400–530
    B/thread on sm_90 at r = 64 (compile_check): keep tiles of at most 64 rows there."""
    if kwargs.get("ONE_PASS"):
        configs_ = [c for c in configs_ if c.kwargs["BLOCK_M"] <= 64] or configs_
    elif kwargs.get("DROPOUT"):
        # dx's dropout mask is drawn over the whole output tile at once: past 64 elements per
        # thread the Philox state spilled 56–424 B/thread on sm_90 (compile_check, r = 16).
        configs_ = [c for c in configs_
                    if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps
                    ] or configs_
    return XW_XA_STAGE_BYTES(configs_, args, **kwargs)


_prune.estimate = XW_XA_STAGE_BYTES.estimate


@triton.jit
def _u_vt(acc, X, U, V, rows, cols, rs, M, N, R, stride_um, stride_ur, stride_vn, stride_vr,
          DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + u[rows]·v[cols]ᵀ as R extra steps of the K loop: u is small, so it streams in
    BLOCK_R chunks; both operands in x's dtype for tl.dot."""
    row_ok = rows < M
    col_ok = cols < N
    for r0 in range(0, R, BLOCK_R):
        r_ok = (r0 + rs) < R
        u = tl.load(U + rows[:, None] * stride_um + (r0 + rs)[None, :] * stride_ur,
                    mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        v_t = tl.load(V + cols[None, :] * stride_vn + (r0 + rs)[:, None] * stride_vr,
                      mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(u.to(X.dtype.element_ty), v_t.to(X.dtype.element_ty), acc,
                     input_precision=DOT_PRECISION)
    return acc


# Every constexpr the launcher sets is part of the key (the transposed operands of the
# backward's dx = dy·W + dt·a read W and a along other strides: another best config).
@_tuning.register
@triton.autotune(configs=_CONFIGS,
                 key=["M_BUCKET", "N", "K", "R", "ONE_PASS", "HAS_BIAS", "HAS_LOWRANK", "HAS_S",
                      "HAS_CORE", "STORE_T", "W_TRANSPOSED", "V_TRANSPOSED", "DOT_PRECISION",
                      "BLOCK_R", "DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["SEED"])   # a fresh seed per call must not recompile
def _xw_plus_ub_kernel(
    X, W, U, V, BIAS, A, S, CORE, T, Y,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_um, stride_ur, stride_vn, stride_vr,
    stride_bias, stride_ar, stride_ak, stride_s, stride_cr, stride_cc, stride_tm, stride_tr,
    stride_ym, stride_yn, SEED, P,
    DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr,
    ONE_PASS: tl.constexpr,
    HAS_S: tl.constexpr, HAS_CORE: tl.constexpr, STORE_T: tl.constexpr,
    W_TRANSPOSED: tl.constexpr, V_TRANSPOSED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # W_TRANSPOSED and V_TRANSPOSED only key the autotuner; the strides carry the layout.
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = indices(pid_m * BLOCK_M, BLOCK_M)
    cols = indices(pid_n * BLOCK_N, BLOCK_N)
    rs = tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DROPOUT and HAS_LOWRANK and not ONE_PASS:
        # dx = dy·W + keep ⊙ (dt·a)/(1 − p): the r steps first, masked, then the K loop adds
        # onto them, so one (BLOCK_M, BLOCK_N) accumulator is live at a time, not two.
        acc = _u_vt(acc, X, U, V, rows, cols, rs, M, N, R, stride_um, stride_ur, stride_vn,
                    stride_vr, DOT_PRECISION, BLOCK_R)
        acc = tl.where(dropout_kept(SEED, rows, pid_n * BLOCK_N, N, P, BLOCK_N),
                       acc * (1.0 / (1.0 - P)), 0.0)
    acc, t = xw_and_xa_tiles(acc, X, W, A, rows, cols, rs, M, N, K, R, stride_xm, stride_xk,
                             stride_wn, stride_wk, stride_ar, stride_ak, SEED, P,
                             DROPOUT, ONE_PASS, DOT_PRECISION,
                             BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)

    if HAS_LOWRANK:
        if ONE_PASS:
            rank_ok = rs < R
            if STORE_T:
                if pid_n == 0:
                    tl.store(T + rows[:, None] * stride_tm + rs[None, :] * stride_tr, t,
                             mask=row_ok[:, None] & rank_ok[None, :])
            u = t
            if HAS_S:
                u = u * tl.load(S + rs * stride_s, mask=rank_ok,
                                other=0.0).to(tl.float32)[None, :]
            if HAS_CORE:
                core_t = tl.load(CORE + rs[None, :] * stride_cr + rs[:, None] * stride_cc,
                                 mask=rank_ok[:, None] & rank_ok[None, :], other=0.0)
                u = tl.dot(u, core_t.to(tl.float32), input_precision=_EPILOGUE)
            v_t = tl.load(V + cols[None, :] * stride_vn + rs[:, None] * stride_vr,
                          mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(u.to(X.dtype.element_ty), v_t.to(X.dtype.element_ty), acc,
                         input_precision=DOT_PRECISION)
        elif not DROPOUT:       # (with DROPOUT the masked r steps ran before the K loop)
            acc = _u_vt(acc, X, U, V, rows, cols, rs, M, N, R, stride_um, stride_ur, stride_vn,
                        stride_vr, DOT_PRECISION, BLOCK_R)

    if HAS_BIAS:
        acc += tl.load(BIAS + cols * stride_bias, mask=col_ok,
                       other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(Y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _launch(x, w, w_transposed, v, v_transposed, bias, *, u=None, a=None, s=None, core=None,
            store_t=False, dropout=0.0, seed=0):
    guard = check_device(x, w=w, v=v, bias=bias, u=u, a=a, s=s, core=core)
    # The GEMM's adapter operands in x's dtype once, before their strides are read.
    if v is not None:
        v = as_operand(v, x)
    if a is not None:
        a = as_operand(a, x)
    M, K = x.shape
    N = w.shape[1] if w_transposed else w.shape[0]
    swn, swk = (w.stride(1), w.stride(0)) if w_transposed else (w.stride(0), w.stride(1))
    assert (w.shape[0] if w_transposed else w.shape[1]) == K
    one_pass = a is not None
    has_lowrank = v is not None
    if has_lowrank:
        R = v.shape[0] if v_transposed else v.shape[1]
        svn, svr = (v.stride(1), v.stride(0)) if v_transposed else (v.stride(0), v.stride(1))
    else:
        R, svn, svr = 0, 0, 0
    block_r = rank_pad(max(R, 1)) if one_pass else min(rank_pad(max(R, 1)), 64)
    if one_pass:
        assert block_r <= MAX_EPILOGUE_RANK, "one-pass keeps the whole rank in registers"
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    t = torch.empty((M, R), device=x.device, dtype=torch.float32) if store_t else y
    dummy = y
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    LAUNCHES["xw_plus_xasb" if one_pass else "xw_plus_ub"] += 1
    with guard:
        _xw_plus_ub_kernel[grid](
            x, w, u if u is not None else dummy, v if v is not None else dummy,
            bias if bias is not None else dummy, a if a is not None else dummy,
            s if s is not None else dummy, core if core is not None else dummy, t, y,
            M, N, K, R, m_bucket(M),
            x.stride(0), x.stride(1), swn, swk,
            u.stride(0) if u is not None else 0, u.stride(1) if u is not None else 0, svn, svr,
            bias.stride(0) if bias is not None else 0,
            a.stride(0) if a is not None else 0, a.stride(1) if a is not None else 0,
            s.stride(0) if s is not None else 0,
            core.stride(0) if core is not None else 0, core.stride(1) if core is not None else 0,
            t.stride(0) if store_t else 0, t.stride(1) if store_t else 0,
            y.stride(0), y.stride(1), seed, float(dropout),
            DROPOUT=dropout != 0.0, HAS_BIAS=bias is not None, HAS_LOWRANK=has_lowrank,
            ONE_PASS=one_pass,
            HAS_S=s is not None, HAS_CORE=core is not None, STORE_T=store_t,
            W_TRANSPOSED=w_transposed, V_TRANSPOSED=v_transposed,
            DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=block_r,
        )
    return y, (t if store_t else None)


def xw_plus_ub(x, w, u=None, v=None, bias=None, *, w_transposed=False, v_transposed=False,
               dropout=0.0, seed=0):
    """y = x·Wᵀ + u·vᵀ + bias in one kernel, y in x's dtype.

    x (M, K); w (N, K), or (K, N) when w_transposed; u (M, R) fp32 and v (N, R), or (R, N)
    when v_transposed; bias (N,). u and v are both given or both None.
    dropout, seed (the backward's dx = dy·W + dt·a of a dropped adapter input): the u·vᵀ term
    is masked by the (M, N) input's dropout mask (_tiles.dropout_kept) and scaled by
    1/(1 − dropout); 0 = off.
    """
    assert (u is None) == (v is None)
    assert dropout == 0.0 or u is not None, "dropout masks the low-rank term"
    return _launch(x, w, w_transposed, v, v_transposed, bias, u=u, dropout=dropout,
                   seed=seed)[0]


def xw_plus_xasb(x, w, a, v, bias=None, *, s=None, core=None, store_t=True, dropout=0.0,
                 seed=0):
    """One pass over x: y = x·Wᵀ + ((x·aᵀ ⊙ s)·coreᵀ)·vᵀ + bias; returns (y, t) with
    t = x·aᵀ (fp32) when store_t. a (R, K), v (N, R), R ≤ 128. dropout, seed: x·aᵀ reads
    dropout(x) (x·Wᵀ reads x), so t = dropout(x)·aᵀ; 0 = off."""
    return _launch(x, w, False, v, False, bias, a=a, s=s, core=core, store_t=store_t,
                   dropout=dropout, seed=seed)
