"""Skinny product for the adapter bank: t = x·aᵀ, then u_i = (t_i ⊙ s)·cores[id_i]ᵀ per row.

The "fused" strategy's first kernel for sv_bank_linear (DESIGN.md §3): every program owns
BLOCK_M rows and the whole rank, loops over K once, and in its epilogue scales by s and
multiplies each row by its own gathered r×r core. It writes only t and u (both (M, R) fp32);
xw_plus_ub then adds u·b_effᵀ to the base GEMM so y is written once.
"""
import torch
import triton
import triton.language as tl

from svk.kernels import _tuning
from svk.kernels._common import (LAUNCHES, MAX_EPILOGUE_RANK, as_operand, check_device,
                                 configs, dot_precision, m_bucket, rank_pad)
from svk.kernels._tiles import indices, x_at_tile
from svk.kernels.x_at import X_AT_STAGE_BYTES
from svk.kernels.gather_core import gathered_core_matvec

_CONFIGS = configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=st)
     for bm, bk, w, st in [(16, 256, 4, 4), (32, 128, 4, 4), (64, 128, 4, 3),
                           (128, 64, 8, 3)]],
    {"BLOCK_M": 16, "BLOCK_K": 32},
)


@_tuning.register
@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "K", "BLOCK_R", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": X_AT_STAGE_BYTES})
@triton.jit
def _x_at_gather_core_kernel(
    X, A, S, CORES, IDS, T, U,
    M, K, R, N_ADAPTERS, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_s, stride_cn, stride_cr, stride_cc,
    stride_id, stride_tm, stride_tr, stride_um, stride_ur,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = indices(tl.program_id(0) * BLOCK_M, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < M
    rank_ok = ranks < R
    # No adapter dropout here (seed 0, p 0, DROPOUT off): the bank serves inference.
    t = x_at_tile(X, A, rows, ranks, M, K, R, stride_xm, stride_xk, stride_ar, stride_ak,
                  0, 0.0, False, DOT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)

    out_mask = row_ok[:, None] & rank_ok[None, :]
    tl.store(T + rows[:, None] * stride_tm + ranks[None, :] * stride_tr, t, mask=out_mask)
    p = t * tl.load(S + ranks * stride_s, mask=rank_ok, other=0.0).to(tl.float32)[None, :]
    ids = tl.load(IDS + rows * stride_id, mask=row_ok, other=-1)
    u = gathered_core_matvec(p, ranks, ids, CORES, R, N_ADAPTERS, stride_cn, stride_cr,
                             stride_cc)
    tl.store(U + rows[:, None] * stride_um + ranks[None, :] * stride_ur, u, mask=out_mask)


def x_at_gather_core(x, a, s, cores, ids):
    """t = x·aᵀ and u_i = (t_i ⊙ s)·cores[id_i]ᵀ, both fp32 (M, R); rows with id −1 get u = 0.

    x (M, K); a (R, K), any float dtype; s (R,), any stride; cores (N, R, R); ids (M,)
    integer.
    """
    guard = check_device(x, a=a, s=s, cores=cores, ids=ids)
    M, K = x.shape
    R = a.shape[0]
    assert a.shape[1] == K and cores.shape[1:] == (R, R) and ids.shape == (M,)
    if rank_pad(R) > MAX_EPILOGUE_RANK:
        # Past the register budget the r×r step runs as its own launch; it is cheap next to
        # the skinny GEMM at such ranks.
        from svk.kernels.gather_core import gather_core
        from svk.kernels.x_at import x_at
        t, _ = x_at(x, a)
        return t, gather_core(t, cores, ids, s=s)
    a = as_operand(a, x)
    t = torch.empty((M, R), device=x.device, dtype=torch.float32)
    u = torch.empty_like(t)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    LAUNCHES["x_at_gather_core"] += 1
    with guard:
        _x_at_gather_core_kernel[grid](
            x, a, s, cores, ids, t, u,
            M, K, R, cores.shape[0], m_bucket(M),
            x.stride(0), x.stride(1), a.stride(0), a.stride(1), s.stride(0),
            cores.stride(0), cores.stride(1), cores.stride(2), ids.stride(0),
            t.stride(0), t.stride(1), u.stride(0), u.stride(1),
            DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=rank_pad(R),
        )
    return t, u
