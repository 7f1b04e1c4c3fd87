"""Skinny product t = x·aᵀ with the r-sized epilogue u = (t ⊙ s)·coreᵀ in registers.

x is (M, K) and a is (R, K) with R small (the adapter rank): every program owns BLOCK_M rows
and a BLOCK_R-wide slice of the rank, loops over K once, and writes only (M, R) fp32 results.
The same kernel computes du = dy·b_eff in the backward (a = b_effᵀ through strides).

With adapter dropout (DROPOUT) t = dropout(x)·aᵀ: each x tile is masked in registers by
Philox numbers, a pure function of (seed, row, col) (_tiles.dropout_kept), so no mask is
stored and the backward redraws the same one; du = dy·b_eff never drops anything.
"""
import torch
import triton
import triton.language as tl

from svk.kernels import _tuning
from svk.kernels._common import (EPILOGUE_PRECISION, LAUNCHES, MAX_EPILOGUE_RANK,
                                 adapter_copy_bytes, as_operand, check_device, configs,
                                 core_epilogue_bytes, dot_precision, m_bucket,
                                 prune_by_shared_memory, rank_pad)
from svk.kernels._tiles import indices, x_at_tile

_EPILOGUE = tl.constexpr(EPILOGUE_PRECISION)

_CONFIGS = configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=st)
     for bm, bk, w, st in [(16, 256, 4, 4), (32, 128, 4, 4), (64, 128, 4, 3),
                           (128, 64, 8, 3), (128, 128, 8, 3), (256, 64, 8, 3)]],
    {"BLOCK_M": 16, "BLOCK_K": 32},
)


# One K step loads an x tile and an a tile (a in x's dtype since the launcher converts it;
# in its own dtype, with a converted copy, when called otherwise); then the core epilogue.
X_AT_STAGE_BYTES = prune_by_shared_memory(
    lambda a: a["BLOCK_K"] * (a["BLOCK_M"] * a["X"].element_size()
                              + a["BLOCK_R"] * a["A"].element_size()),
    adapter_copy_bytes, core_epilogue_bytes)


# Every constexpr the launcher sets is part of the key: a config tuned with the core epilogue
# off (or a transposed a, or TF32) is not the best one with it on.
@_tuning.register
@triton.autotune(configs=_CONFIGS,
                 key=["M_BUCKET", "K", "BLOCK_R", "HAS_S", "HAS_CORE", "WRITE_U",
                      "A_TRANSPOSED", "DOT_PRECISION", "DROPOUT"],
                 prune_configs_by={"early_config_prune": X_AT_STAGE_BYTES})
@triton.jit(do_not_specialize=["SEED"])   # a fresh seed per call must not recompile
def _x_at_kernel(
    X, A, S, CORE, T, U,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_s, stride_cr, stride_cc,
    stride_tm, stride_tr, stride_um, stride_ur, SEED, P,
    DROPOUT: tl.constexpr, HAS_S: tl.constexpr, HAS_CORE: tl.constexpr, WRITE_U: tl.constexpr,
    A_TRANSPOSED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # A_TRANSPOSED only keys the autotuner (the strides already say how a is laid out).
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = indices(pid_m * BLOCK_M, BLOCK_M)
    ranks = indices(pid_r * BLOCK_R, BLOCK_R)
    row_ok = rows < M
    rank_ok = ranks < R
    acc = x_at_tile(X, A, rows, ranks, M, K, R, stride_xm, stride_xk, stride_ar, stride_ak,
                    SEED, P, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)

    out_mask = row_ok[:, None] & rank_ok[None, :]
    tl.store(T + rows[:, None] * stride_tm + ranks[None, :] * stride_tr, acc, mask=out_mask)
    if WRITE_U:
        u = acc
        if HAS_S:
            u = u * tl.load(S + ranks * stride_s, mask=rank_ok,
                            other=0.0).to(tl.float32)[None, :]
        if HAS_CORE:
            # u·coreᵀ needs the whole rank in this program: the launcher sets BLOCK_R ≥ R.
            core_t = tl.load(CORE + ranks[None, :] * stride_cr + ranks[:, None] * stride_cc,
                             mask=rank_ok[:, None] & rank_ok[None, :], other=0.0)
            u = tl.dot(u, core_t.to(tl.float32), input_precision=_EPILOGUE)
        tl.store(U + rows[:, None] * stride_um + ranks[None, :] * stride_ur, u, mask=out_mask)


def x_at(x, a, s=None, core=None, *, a_transposed=False, dropout=0.0, seed=0):
    """t = x·aᵀ (fp32, (M, R)) and, when s or core is given, u = (t ⊙ s)·coreᵀ (fp32).

    x: (M, K) activations (fp32/fp16/bf16). a: (R, K), or (K, R) when a_transposed (the
    backward passes b_eff this way), any float dtype (converted to x's once). s: (R,) or
    None, any stride (a slice or an expanded scalar). core: (R, R) or None.
    dropout, seed: t = dropout(x)·aᵀ with the mask of (seed, row, col) (_tiles.dropout_kept),
    kept entries scaled by 1/(1 − dropout); 0 = off (the kernel is then today's exactly).
    Returns (t, u); u is None when neither s nor core is given.
    """
    guard = check_device(x, a=a, s=s, core=core)
    assert x.dim() == 2, "x must be 2-D (M, K)"
    a = as_operand(a, x)    # before reading its strides: the copy may lay a out anew
    M, K = x.shape
    if a_transposed:
        R = a.shape[1]
        stride_ar, stride_ak = a.stride(1), a.stride(0)
    else:
        R = a.shape[0]
        stride_ar, stride_ak = a.stride(0), a.stride(1)
    assert (a.shape[1] if not a_transposed else a.shape[0]) == K
    write_u = s is not None or core is not None
    if core is not None and rank_pad(R) > MAX_EPILOGUE_RANK:
        # The core epilogue needs the whole rank in registers; past that size the r×r product
        # is cheap next to the skinny GEMM, so it runs as a separate matmul.
        t, u = x_at(x, a, s, None, a_transposed=a_transposed, dropout=dropout, seed=seed)
        return t, (u if u is not None else t) @ core.t().float()
    block_r = rank_pad(R) if (core is not None or R <= MAX_EPILOGUE_RANK) else MAX_EPILOGUE_RANK
    t = torch.empty((M, R), device=x.device, dtype=torch.float32)
    u = torch.empty_like(t) if write_u else t
    dummy = t
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, meta["BLOCK_R"]))
    LAUNCHES["x_at"] += 1
    with guard:
        _x_at_kernel[grid](
            x, a, s if s is not None else dummy, core if core is not None else dummy, t, u,
            M, K, R, m_bucket(M),
            x.stride(0), x.stride(1), stride_ar, stride_ak,
            s.stride(0) if s is not None else 0,
            core.stride(0) if core is not None else 0, core.stride(1) if core is not None else 0,
            t.stride(0), t.stride(1), u.stride(0), u.stride(1), seed, float(dropout),
            DROPOUT=dropout != 0.0, HAS_S=s is not None, HAS_CORE=core is not None, WRITE_U=write_u,
            A_TRANSPOSED=a_transposed, DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=block_r,
        )
    return t, (u if write_u else None)
