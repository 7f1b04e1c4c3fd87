"""The adapter-dropout mask as a tensor, for the one product that needs it whole.

The forward kernels mask x tiles in registers (_tiles.dropout_kept) and never write a mask.
The backward's da = dtᵀ·(x ⊙ keep)/(1 − p) reduces over the rows, so the mask falls on the
product's reduction dimension; rather than a masked-operand variant of the GEMM kernel, this
kernel writes x ⊙ keep (unscaled) once, transiently: it exists only while da is computed in
the backward, never between forward and backward. The same Philox numbers as every other
kernel, from (seed, row, col), so the mask is the forward's.
"""
import torch
import triton
import triton.language as tl

from svk.kernels._common import INTERPRET, LAUNCHES, check_device
from svk.kernels._tiles import dropout_kept, indices

# An elementwise pass: one fixed tile, nothing worth autotuning.
_BLOCK_M, _BLOCK_N, _WARPS = (16, 64, 4) if INTERPRET else (32, 128, 4)


@triton.jit(do_not_specialize=["SEED"])   # a fresh seed per call must not recompile
def _dropped_input_kernel(X, Y, M, N, stride_xm, stride_xn, stride_ym, stride_yn, SEED, P,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = indices(tl.program_id(0) * BLOCK_M, BLOCK_M)
    cols = indices(tl.program_id(1) * BLOCK_N, BLOCK_N)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=ok, other=0.0)
    x = tl.where(dropout_kept(SEED, rows, tl.program_id(1) * BLOCK_N, N, P, BLOCK_N), x,
                 tl.zeros_like(x))
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :] * stride_yn, x, mask=ok)


def dropped_input(x, dropout, seed):
    """x ⊙ keep (M, N) in x's dtype, NOT scaled by 1/(1 − dropout) (the caller scales its fp32
    product once): the entries the kernels' adapter dropout with this (dropout, seed) drops
    are zero, the others x's exactly. dropped_input(ones, p, seed) is the 0/1 mask itself."""
    guard = check_device(x)
    assert x.dim() == 2, "x must be 2-D (M, N)"
    assert 0.0 < dropout < 1.0, "dropout must be in (0, 1)"
    M, N = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return y
    LAUNCHES["dropped_input"] += 1
    with guard:
        _dropped_input_kernel[(triton.cdiv(M, _BLOCK_M), triton.cdiv(N, _BLOCK_N))](
            x, y, M, N, x.stride(0), x.stride(1), y.stride(0), y.stride(1), seed,
            float(dropout), BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, num_warps=_WARPS)
    return y
