"""The bank's per-row gathered r×r product: u_i = p_i·cores[id_i]ᵀ, rows with id −1 give 0.

`gathered_core_matvec` is a @triton.jit helper that the skinny kernel (x_at_gather_core) and
the one-pass decode kernel (xw_plus_xa_gather_core_b) call in their epilogues;
`gather_core` launches it on its own for rows already computed (the backward's dp = du·cores[id]
reads each core transposed through strides).

Every row reads its own core, so the work and the number of launches are the same whether a
batch holds one adapter or one per row. Ids that are negative or ≥ n_adapters read nothing
and give u = 0: the kernels never read out of bounds, and the op checks the ids (DESIGN.md §2).
"""
import torch
import triton
import triton.language as tl

from svk.kernels import _tuning
from svk.kernels._common import (LAUNCHES, check_device, configs, first_if_untuned, m_bucket,
                                 rank_pad)
from svk.kernels._tiles import indices


@triton.jit
def gathered_core_matvec(p, ranks, ids, CORES, R, N_ADAPTERS, stride_cn, stride_cr, stride_cc):
    """u[m, j] = Σ_k p[m, k]·cores[ids[m], j, k] for a (BLOCK_M, BLOCK_R) fp32 tile p;
    ranks int64 (as every index multiplying a stride, see _tiles).

    One rank column per step keeps only (BLOCK_M, BLOCK_R) values live, whatever R is: a
    (BLOCK_M, R, R) tile of gathered cores would spill registers at R = 64.
    """
    valid = (ids >= 0) & (ids < N_ADAPTERS)
    core_rows = (CORES + tl.where(valid, ids, 0).to(tl.int64)[:, None] * stride_cn
                 + ranks[None, :] * stride_cr)
    load_mask = valid[:, None] & (ranks < R)[None, :]
    u = tl.zeros_like(p)
    for k in range(0, R):
        p_k = tl.sum(tl.where(ranks[None, :] == k, p, 0.0), axis=1)
        core_k = tl.load(core_rows + tl.cast(k, tl.int64) * stride_cc, mask=load_mask,
                         other=0.0)
        u += p_k[:, None] * core_k.to(tl.float32)
    return u


_CONFIGS = configs(
    [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in [(16, 4), (32, 4), (64, 4)]],
    {"BLOCK_M": 16},
)


# Keyed on the rows (bucketed) too: 16-row tiles suit a decode step, 64-row ones a batch.
@_tuning.register
@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "BLOCK_R", "HAS_S", "TRANSPOSE"],
                 prune_configs_by={"early_config_prune": first_if_untuned})
@triton.jit
def _gather_core_kernel(
    P, S, CORES, IDS, U,
    M, R, N_ADAPTERS, M_BUCKET,
    stride_pm, stride_pr, stride_s, stride_cn, stride_cr, stride_cc, stride_id, stride_um,
    stride_ur,
    HAS_S: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # TRANSPOSE only keys the autotuner: the launcher swapped the core strides.
    rows = indices(tl.program_id(0) * BLOCK_M, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < M
    mask = row_ok[:, None] & (ranks < R)[None, :]
    p = tl.load(P + rows[:, None] * stride_pm + ranks[None, :] * stride_pr, mask=mask,
                other=0.0).to(tl.float32)
    if HAS_S:
        p = p * tl.load(S + ranks * stride_s, mask=ranks < R, other=0.0).to(tl.float32)[None, :]
    ids = tl.load(IDS + rows * stride_id, mask=row_ok, other=-1)
    u = gathered_core_matvec(p, ranks, ids, CORES, R, N_ADAPTERS, stride_cn, stride_cr,
                             stride_cc)
    tl.store(U + rows[:, None] * stride_um + ranks[None, :] * stride_ur, u, mask=mask)


def gather_core(p, cores, ids, *, s=None, transpose=False):
    """u_i = (p_i ⊙ s)·cores[id_i]ᵀ (or ·cores[id_i] when transpose), fp32 (M, R).

    p (M, R) any float dtype; cores (N, R, R); ids (M,) integer, −1 (or any id outside
    [0, N)) gives a zero row; s (R,) optional.
    """
    guard = check_device(p, cores=cores, ids=ids, s=s)
    M, R = p.shape
    assert cores.shape[1:] == (R, R) and ids.shape == (M,)
    stride_cr, stride_cc = cores.stride(1), cores.stride(2)
    if transpose:
        stride_cr, stride_cc = stride_cc, stride_cr
    u = torch.empty((M, R), device=p.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    LAUNCHES["gather_core"] += 1
    with guard:
        _gather_core_kernel[grid](
            p, s if s is not None else u, cores, ids, u,
            M, R, cores.shape[0], m_bucket(M),
            p.stride(0), p.stride(1), s.stride(0) if s is not None else 0,
            cores.stride(0), stride_cr, stride_cc, ids.stride(0), u.stride(0), u.stride(1),
            HAS_S=s is not None, TRANSPOSE=transpose, BLOCK_R=rank_pad(R),
        )
    return u
