"""Pieces every op shares: the accumulation dtype, the folded up-projection b_eff, du, and the
input-side gradients."""
import torch


def acc_dtype(x):
    """Adapter math runs in fp32 (fp64 for fp64 inputs, so gradcheck sees no fp32 noise)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def cast(t, dtype):
    """t in dtype, without a dispatch when it already is (each .to() costs host time)."""
    return t if t.dtype == dtype else t.to(dtype)


def b_eff(b, out_scale, scaling, dtype):
    """scaling·out_scale ⊙ b (out, r): folding both into b makes the adapter one rank-r
    product added to the base GEMM's accumulator."""
    folded = cast(b, dtype) * scaling
    return folded if out_scale is None else folded * cast(out_scale, dtype)[:, None]


_SMALL = 1 << 16


def add_up_projection(y, u, b, out_scale, scaling):
    """y + scaling·(u·bᵀ) ⊙ out_scale for a fresh y in x's dtype and u (M, r): one addmm
    (in place into y unless scaling is 1, where F.linear(u, b, y) costs less host time)."""
    if out_scale is None:
        if scaling == 1.0 and y.numel() <= _SMALL:
            # F.linear's own addmm: no Python-side transpose, no alpha — less host time at
            # decode sizes; larger outputs are updated in place (no second (M, out) tensor).
            return torch.nn.functional.linear(cast(u, y.dtype), cast(b, y.dtype), y)
        return y.addmm_(cast(u, y.dtype), cast(b, y.dtype).t(), alpha=scaling)
    folded = b_eff(b, out_scale, scaling, acc_dtype(y))
    return y.addmm_(cast(u, y.dtype), cast(folded, y.dtype).t())


def up_projection_grad(dy, b, out_scale, scaling, acc):
    """du = dy·b_eff (M, r) in acc, with b_eff = scaling·out_scale ⊙ b."""
    if out_scale is not None:
        return cast(dy @ cast(b_eff(b, out_scale, scaling, acc), dy.dtype), acc)
    du = dy @ cast(b, dy.dtype)
    du = cast(du, acc)
    return du if scaling == 1.0 else du.mul_(scaling)


def dropout_keep(shape, like, p, seed):
    """The adapter-input dropout mask of `shape` (M, in) in like's dtype and device, scaled:
    kept entries 1/(1 − p), dropped 0. Drawn from a generator seeded with `seed`, so the
    backward regenerates the very mask the forward used instead of storing it."""
    generator = torch.Generator(device=like.device).manual_seed(seed)
    keep = torch.rand(shape, generator=generator, device=like.device) >= p
    return keep.to(like.dtype) * (1.0 / (1.0 - p))


def draw_seed():
    """A dropout seed from torch's default CPU generator (torch.manual_seed makes a call
    deterministic) without touching a CUDA stream."""
    return int(torch.randint(0, 2 ** 62, (1,)))


def down_projection_rank(a, in_features):
    """a must be (r, in) with r ≥ 1; returns r."""
    if a.dim() != 2 or a.shape[1] != in_features:
        raise ValueError(f"a must have shape (r, in={in_features}), got {tuple(a.shape)}")
    if a.shape[0] == 0:
        raise ValueError("a has rank 0; the adapter needs r ≥ 1")
    return a.shape[0]


def input_side_grads(dy, x, weight, a, dt, *, need_x, need_w, need_a, triton, w_eff=None,
                     dropout=0.0, seed=0):
    """The gradients every op shares once dt (M, r) is known, as (dx, dW, da), None where
    not needed:  dx = dy·W + dt·a (one GEMM-plus-r kernel on the Triton path, or dy·W_eff
    for the merged strategy),  dW = dyᵀ·x,  da = dtᵀ·x.

    dropout, seed: the adapter saw x ⊙ keep (keep scaled by 1/(1 − dropout)), so
    dx = dy·W + (dt·a) ⊙ keep and da = dtᵀ·(x ⊙ keep); the base GEMM saw x. The mask is
    regenerated from the seed as the forward drew it: dropout_keep on the PyTorch path; on
    the Triton path Philox in the kernels (dx's r steps masked in the GEMM kernel; for da the
    dropped x is written once, transiently, by kernels.dropped_input)."""
    dx = dw = da = None
    if dropout != 0.0:
        assert w_eff is None, "the merged strategy cannot take adapter dropout"
        scale = 1.0 / (1.0 - dropout)
        if triton:
            from svk import kernels
            if need_x:
                dx = kernels.xw_plus_ub(dy, weight, dt, a, w_transposed=True, v_transposed=True,
                                        dropout=dropout, seed=seed)
            if need_a:
                # The scale applied once in a's dtype (fp32 for fp32 adapters), not to x.
                da = cast(cast(dt, x.dtype).t() @ kernels.dropped_input(x, dropout, seed),
                          a.dtype) * scale
        else:
            # x may be an empty stand-in when only dx is needed: the shape comes from dy, W.
            keep = dropout_keep((dy.shape[0], weight.shape[1]), dy, dropout, seed) if (
                need_x or need_a) else None
            if need_x:
                dx = torch.addcmul(dy @ weight, cast(dt, dy.dtype) @ cast(a, dy.dtype), keep)
            if need_a:
                da = cast(cast(dt, x.dtype).t() @ (x * keep), a.dtype)
        if need_w:
            dw = dy.t() @ x
        return dx, dw, da
    if need_x:
        if w_eff is not None:
            from svk import kernels
            dx = kernels.xw_plus_ub(dy, w_eff, w_transposed=True)
        elif triton:
            from svk import kernels
            dx = kernels.xw_plus_ub(dy, weight, dt, a, w_transposed=True, v_transposed=True)
        else:
            dx = torch.addmm(dy @ weight, cast(dt, dy.dtype), cast(a, dy.dtype))
    if need_w:
        dw = dy.t() @ x
    if need_a:
        da = cast(cast(dt, x.dtype).t() @ x, a.dtype)
    return dx, dw, da
