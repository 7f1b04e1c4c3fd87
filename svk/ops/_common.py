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
