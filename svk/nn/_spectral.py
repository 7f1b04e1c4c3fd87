"""The spectral facts the method modules need, for a stack of same-shape weights (n, out, in).

Every function is one batched call into svk.linalg for the whole stack (DESIGN.md §5); the
method classes never loop over matrices. Results are fp32 on the weights' device.

    top(W, r)        -> U (n, out, r), S (n, r), Vh (n, r, in)    descending
    bottom(W, k)     -> U (n, out, k), S (n, k), Vh (n, k, in)    the last k triplets, descending
    spectrum(W)      -> S (n, min(out, in))                        descending
    threshold(S, tau)          -> k per matrix (SARA Algorithm 1)
    tail(S, perc, criterion)   -> k per matrix (SiVA)
"""
from __future__ import annotations

import torch
from torch import Tensor

from svk import linalg as _linalg

# TEMPORARY until svk.linalg lands its bottom_svd / singular_values / threshold / tail:
# the fallbacks below compute an exact torch.linalg.svd (fp64 Gram-free, slower).
_HAS = {name: hasattr(_linalg, name) for name in
        ("rsvd", "bottom_svd", "singular_values", "threshold", "tail")}


def top(W: Tensor, r: int, generator: torch.Generator | None = None):
    if _HAS["rsvd"]:
        return _linalg.rsvd(W, r, generator=generator)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)  # TEMPORARY
    return U[..., :r].float(), S[..., :r].float(), Vh[..., :r, :].float()


def bottom(W: Tensor, k: int):
    if _HAS["bottom_svd"]:
        return _linalg.bottom_svd(W, k)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)  # TEMPORARY
    return U[..., -k:].float(), S[..., -k:].float(), Vh[..., -k:, :].float()


def spectrum(W: Tensor) -> Tensor:
    if _HAS["singular_values"]:
        return _linalg.singular_values(W)
    return torch.linalg.svdvals(W.double()).float()  # TEMPORARY


def threshold(S: Tensor, tau: float) -> list[int]:
    """Smallest k ≥ 1 with S[0] + … + S[k−1] ≥ tau·ΣS, per row of S (n, p)."""
    if _HAS["threshold"]:
        return _as_list(_linalg.threshold(S, tau))
    S = S.double()
    below = torch.cumsum(S, -1) < tau * S.sum(-1, keepdim=True)
    return (below.sum(-1) + 1).clamp(max=S.shape[-1]).tolist()


def tail(S: Tensor, perc: float, criterion: str = "sum") -> list[int]:
    """Largest k ≥ 1 whose smallest k values (or squares, criterion="energy") sum to at most
    (1 − perc) of the total, per row of S (n, p)."""
    if _HAS["tail"]:
        return _as_list(_linalg.tail(S, perc, criterion=criterion))
    S = S.double()
    if criterion == "energy":
        S = S * S
    ascending = torch.cumsum(S.flip(-1), -1)
    fits = ascending <= (1.0 - perc) * S.sum(-1, keepdim=True)
    return fits.sum(-1).clamp(min=1).tolist()


def _as_list(k) -> list[int]:
    if isinstance(k, Tensor):
        return [int(v) for v in k.reshape(-1).tolist()]
    if isinstance(k, int):
        return [k]
    return [int(v) for v in k]
