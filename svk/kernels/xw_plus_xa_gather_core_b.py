"""One pass for the adapter bank's decode step:
y_i = x_i·Wᵀ + bias + ((x_i·aᵀ ⊙ s)·cores[id_i]ᵀ)·b_effᵀ, y written once.

xw_plus_ub's ONE_PASS idea with a per-row gathered core: every program owns a (BLOCK_M,
BLOCK_N) tile of y; the K loop that accumulates x·Wᵀ also accumulates t = x·aᵀ for its rows
from the x tiles it already loaded; after the loop each row is scaled by s, multiplied by its
own r×r core (gather_core.gathered_core_matvec) and the rank-r term u·b_tileᵀ joins the
accumulator before the single store. One launch per layer, whatever the number of distinct
adapters in the batch; the programs of the first N-tile also store t for the backward.
Each N-tile recomputes t and u for its rows: R/BLOCK_N extra FLOPs and R² per row, no extra
memory traffic — the right trade for 1–256 rows, where the launch and x's second read dominate.
"""
import torch
import triton
import triton.language as tl

from svk.kernels import _tuning
from svk.kernels._common import (LAUNCHES, MAX_EPILOGUE_RANK, as_operand, check_device,
                                 configs, dot_precision, m_bucket, rank_pad)
from svk.kernels._tiles import grouped_tile, indices, xw_and_xa_tiles
from svk.kernels.xw_plus_ub import XW_XA_STAGE_BYTES
from svk.kernels.gather_core import gathered_core_matvec

_CONFIGS = configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                   num_warps=w, num_stages=st)
     for bm, bn, bk, w, st in [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4),
                               (32, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3),
                               (128, 128, 64, 8, 3)]],
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2},
)


@_tuning.register
@triton.autotune(configs=_CONFIGS,
                 key=["M_BUCKET", "N", "K", "BLOCK_R", "HAS_BIAS", "STORE_T", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": XW_XA_STAGE_BYTES})
@triton.jit
def _xw_plus_xa_gather_core_b_kernel(
    X, W, A, S, CORES, IDS, V, BIAS, T, Y,
    M, N, K, R, N_ADAPTERS, M_BUCKET, SCALING,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_s,
    stride_cn, stride_cr, stride_cc, stride_id, stride_vn, stride_vr, stride_bias,
    stride_tm, stride_tr, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, STORE_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = indices(pid_m * BLOCK_M, BLOCK_M)
    cols = indices(pid_n * BLOCK_N, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < N
    rank_ok = ranks < R
    # No adapter dropout here (seed 0, p 0, DROPOUT off): the bank serves inference.
    acc, t = xw_and_xa_tiles(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), X, W, A, rows,
                             cols, ranks, M, N, K, R, stride_xm, stride_xk,
                             stride_wn, stride_wk, stride_ar, stride_ak, 0, 0.0, False, True,
                             DOT_PRECISION,
                             BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)

    if STORE_T:
        if pid_n == 0:
            tl.store(T + rows[:, None] * stride_tm + ranks[None, :] * stride_tr, t,
                     mask=row_ok[:, None] & rank_ok[None, :])
    # scaling folds into s here, so b is read as it is stored (no b_eff tensor per call).
    p = t * (tl.load(S + ranks * stride_s, mask=rank_ok, other=0.0).to(tl.float32)
             * SCALING)[None, :]
    ids = tl.load(IDS + rows * stride_id, mask=row_ok, other=-1)
    u = gathered_core_matvec(p, ranks, ids, CORES, R, N_ADAPTERS, stride_cn, stride_cr,
                             stride_cc)
    v_t = tl.load(V + cols[None, :] * stride_vn + ranks[:, None] * stride_vr,
                  mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    acc = tl.dot(u.to(X.dtype.element_ty), v_t.to(X.dtype.element_ty), acc,
                 input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols * stride_bias, mask=col_ok,
                       other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(Y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def xw_plus_xa_gather_core_b(x, w, a, s, cores, ids, v, bias=None, *, scaling=1.0,
                             store_t=True):
    """One launch: y = x·Wᵀ + scaling·((x·aᵀ ⊙ s)·cores[ids]ᵀ)·vᵀ + bias (rows with id −1:
    the base output); returns (y, t) with t = x·aᵀ (fp32) when store_t.

    x (M, K); w (N, K) in x's dtype; a (R, K); s (R,); cores (n, R, R); ids (M,) integer;
    v (N, R) (b); bias (N,). R ≤ 128.
    """
    guard = check_device(x, w=w, a=a, s=s, cores=cores, ids=ids, v=v, bias=bias)
    # The tl.dot operands a and b in x's dtype once (not tile by tile in the K loop).
    a, v = as_operand(a, x), as_operand(v, x)
    M, K = x.shape
    N = w.shape[0]
    R = a.shape[0]
    assert w.shape[1] == K and a.shape[1] == K and v.shape == (N, R)
    assert cores.shape[1:] == (R, R) and ids.shape == (M,)
    block_r = rank_pad(R)
    assert block_r <= MAX_EPILOGUE_RANK, "the one-pass kernel keeps the whole rank in registers"
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    t = torch.empty((M, R), device=x.device, dtype=torch.float32) if store_t else y
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    LAUNCHES["xw_plus_xa_gather_core_b"] += 1
    with guard:
        _xw_plus_xa_gather_core_b_kernel[grid](
            x, w, a, s, cores, ids, v, bias if bias is not None else y, t, y,
            M, N, K, R, cores.shape[0], m_bucket(M), float(scaling),
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), a.stride(0), a.stride(1),
            s.stride(0), cores.stride(0), cores.stride(1), cores.stride(2), ids.stride(0),
            v.stride(0), v.stride(1), bias.stride(0) if bias is not None else 0,
            t.stride(0) if store_t else 0, t.stride(1) if store_t else 0,
            y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, STORE_T=store_t, DOT_PRECISION=dot_precision(x.dtype),
            BLOCK_R=block_r,
        )
    return y, (t if store_t else None)
