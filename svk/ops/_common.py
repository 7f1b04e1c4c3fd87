"""Pieces every op shares: the accumulation dtype and the folded up-projection b_eff."""
import torch


def acc_dtype(x):
    """Adapter math runs in fp32 (fp64 for fp64 inputs, so gradcheck sees no fp32 noise)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def b_eff(b, out_scale, scaling, dtype):
    """scaling·out_scale ⊙ b (out, r): folding both into b makes the adapter one rank-r
    product added to the base GEMM's accumulator."""
    folded = b.to(dtype) * scaling
    return folded if out_scale is None else folded * out_scale.to(dtype)[:, None]


def down_projection_rank(a, in_features):
    """a must be (r, in) with r ≥ 1; returns r."""
    if a.dim() != 2 or a.shape[1] != in_features:
        raise ValueError(f"a must have shape (r, in={in_features}), got {tuple(a.shape)}")
    if a.shape[0] == 0:
        raise ValueError("a has rank 0; the adapter needs r ≥ 1")
    return a.shape[0]


def input_side_grads(dy, x, weight, a, dt, *, need_x, need_w, need_a, triton, w_eff=None):
    """The gradients every op shares once dt (M, r) is known, as (dx, dW, da), None where
    not needed:  dx = dy·W + dt·a (one GEMM-plus-r kernel on the Triton path, or dy·W_eff
    for the merged strategy),  dW = dyᵀ·x,  da = dtᵀ·x."""
    dx = dw = da = None
    if need_x:
        if w_eff is not None:
            from svk import kernels
            dx = kernels.xw_plus_ub(dy, w_eff, w_transposed=True)
        elif triton:
            from svk import kernels
            dx = kernels.xw_plus_ub(dy, weight, dt, a, w_transposed=True, v_transposed=True)
        else:
            dx = torch.addmm(dy @ weight, dt.to(dy.dtype), a.to(dy.dtype))
    if need_w:
        dw = dy.t() @ x
    if need_a:
        da = (dt.to(x.dtype).t() @ x).to(a.dtype)
    return dx, dw, da
