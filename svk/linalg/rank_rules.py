"""Per-layer rank rules of the adaptive methods (DESIGN.md §4), computed from a spectrum.

Both accept S of shape (p,) (returns a Python int) or (..., p) (returns a LongTensor of shape
(...), one k per matrix, on S's device). S must be non-negative and sorted descending, as
``singular_values`` and ``torch.linalg.svdvals`` return it; sums are taken in float64.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor


def threshold(S, tau: float):
    """SARA's rank (Algorithm 1): the smallest k >= 1 with S[0] + … + S[k−1] >= tau·ΣS.

    tau in (0, 1]; tau = 1 gives the number of non-zero singular values (all of them for a
    full-rank W), a tiny tau gives 1. SARA uses tau = 0.01, Mo-SARA tau = 0.5.
    """
    S = _check_spectrum(S)
    tau = _check_fraction(tau, "tau")
    csum = torch.cumsum(S.to(torch.float64), dim=-1)
    # The cumulative sum's own last entry is the total, so tau = 1 is reached exactly at the
    # last non-zero value (a separately rounded S.sum() could sit one ulp above it).
    target = tau * csum[..., -1:]
    k = (csum < target).sum(dim=-1) + 1
    return _as_output(k.clamp(max=S.shape[-1]), S)


def tail(S, perc: float, criterion: str = "sum"):
    """SiVA's rank: the largest k whose k smallest singular values hold at most (1 − perc) of
    the total, k >= 1.

    criterion="energy" compares squares S[p−k]² + … + S[p−1]² with (1 − perc)·ΣS²: the
    paper's method section ("the bottom (1 − perc)% of the variance"), and the default of
    svk.nn.SiVALinear. criterion="sum" compares S[p−k] + … + S[p−1] with (1 − perc)·ΣS (the
    paper's conclusion: "cumulative sum of singular values"); it is this function's default
    for backward compatibility, so pass criterion explicitly. The two differ a lot: on
    MiniLM-L6's query/value weights at perc 0.95, "energy" keeps 49.7 % of the singular values
    and "sum" 28.9 %. perc in (0, 1]; when even the smallest value exceeds the budget
    (e.g. perc = 1) k is 1.
    """
    S = _check_spectrum(S)
    perc = _check_fraction(perc, "perc")
    if criterion not in ("sum", "energy"):
        raise ValueError(f"criterion must be 'sum' or 'energy', got {criterion!r}")
    x = S.to(torch.float64)
    if criterion == "energy":
        x = x.square()
    tail_sums = torch.cumsum(x.flip(-1), dim=-1)         # tail_sums[..., k−1]: smallest k
    total = tail_sums[..., -1:]
    # total − perc·total rather than (1 − perc)·total: exact for "round" inputs such as
    # perc = 0.9 on a total of 10, where (1 − 0.9)·10 rounds to just below 1.
    budget = total - perc * total
    k = (tail_sums <= budget).sum(dim=-1)                # tail_sums is non-decreasing in k
    return _as_output(k.clamp(min=1), S)


def _check_spectrum(S) -> Tensor:
    if not isinstance(S, Tensor):
        try:
            S = torch.as_tensor(S, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"S must be a tensor or a sequence of numbers, got "
                            f"{type(S).__name__}") from error
    if not S.is_floating_point():
        raise TypeError(f"S must have a floating dtype, got {S.dtype}")
    if S.ndim < 1 or S.shape[-1] == 0:
        raise ValueError(f"S must have shape (p,) or (..., p) with p >= 1, got {tuple(S.shape)}")
    if S.numel() and not bool(torch.isfinite(S).all()):
        raise ValueError("S contains NaN or Inf")
    if S.numel() and bool((S < 0).any()):
        raise ValueError("S must be non-negative (singular values)")
    if S.shape[-1] > 1 and bool((S[..., 1:] > S[..., :-1]).any()):
        raise ValueError("S must be sorted in descending order, as svk.linalg.singular_values "
                         "returns it")
    return S


def _check_fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in (0, 1], got {type(value).__name__}")
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def _as_output(k: Tensor, S: Tensor):
    return int(k) if S.ndim == 1 else k.to(torch.long)
