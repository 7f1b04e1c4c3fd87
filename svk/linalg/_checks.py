"""Argument checks, the result type and the sign convention shared by svk.linalg."""
from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
from torch import Tensor


class SVDResult(NamedTuple):
    """Singular triplets W ≈ U·diag(S)·Vh; unpacks like torch.linalg.svd's result."""

    U: Tensor
    S: Tensor
    Vh: Tensor


def check_matrix(W, name: str = "W") -> None:
    """Raise TypeError/ValueError unless ``W`` is a finite floating tensor of shape (..., m, n)."""
    if not isinstance(W, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if not W.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float64/32/16, bfloat16), got {W.dtype}")
    if W.is_meta:
        raise TypeError(f"{name} is on the meta device, which holds no values to decompose: "
                        "initialise SVD-based adapters (LoRA-XS, SARA, Mo-SARA, KaSA, SiVA, "
                        "PiSSA) on a model with real weights (LoRA injects into a meta model)")
    if W.ndim < 2:
        raise ValueError(f"{name} must have shape (m, n) or (..., m, n), got ndim={W.ndim} "
                         f"(shape {tuple(W.shape)})")
    if W.shape[-1] == 0 or W.shape[-2] == 0:
        raise ValueError(f"{name} must have m, n >= 1, got shape {tuple(W.shape)}")
    # One reduction over W: acceptable on the initialisation path, and a NaN would otherwise
    # surface as a LAPACK error or silently as garbage factors.
    if W.numel() and not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_rank(rank, W: Tensor, name: str = "rank") -> int:
    """Return ``rank`` as an int after checking 1 <= rank <= min(m, n)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(rank).__name__}")
    rank = int(rank)
    m, n = W.shape[-2:]
    if rank <= 0:
        raise ValueError(f"{name} must be >= 1, got {rank}")
    if rank > min(m, n):
        raise ValueError(f"{name}={rank} exceeds min(m, n)={min(m, n)} for W of shape "
                         f"{tuple(W.shape)}")
    return rank


def check_count(value, name: str, minimum: int = 0) -> int:
    """Return ``value`` as an int after checking it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def canonical_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each triplet so that the largest-|.| entry of its U column is positive.

    Singular vectors are defined up to a joint sign; fixing it makes results comparable across
    runs, devices and algorithms (and so makes adapter initialisation reproducible).
    """
    idx = U.abs().argmax(dim=-2, keepdim=True)                      # (..., 1, r)
    sign = torch.sign(torch.gather(U, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, Vh * sign.mT
