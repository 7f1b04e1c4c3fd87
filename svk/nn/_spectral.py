"""The spectral facts the method modules need, for a stack of same-shape weights (n, out, in).

Every function is one batched svk.linalg call for the whole stack (DESIGN.md §5); the method
classes never loop over matrices. Results are fp32 on the weights' device.

    top(W, r)        -> U (n, out, r), S (n, r), Vh (n, r, in)    descending (rsvd)
    bottom(W, k)     -> U (n, out, k), S (n, k), Vh (n, k, in)    the last k triplets, descending
    spectrum(W)      -> S (n, min(out, in))                        descending
    threshold(S, tau)          -> [k per matrix] (SARA Algorithm 1)
    tail(S, perc, criterion)   -> [k per matrix] (SiVA)
"""
from __future__ import annotations

import torch
from torch import Tensor

from svk import linalg


def top(W: Tensor, r: int, generator: torch.Generator | None = None):
    return tuple(linalg.rsvd(W, r, generator=generator))


def bottom(W: Tensor, k: int):
    return tuple(linalg.bottom_svd(W, k))


def spectrum(W: Tensor) -> Tensor:
    return linalg.singular_values(W)


def threshold(S: Tensor, tau: float) -> list[int]:
    return _as_list(linalg.threshold(S, tau))


def tail(S: Tensor, perc: float, criterion: str) -> list[int]:
    # criterion has no default here: svk.linalg.tail defaults to "sum" while SiVA's default is
    # "energy", so the method must always say which one it means.
    return _as_list(linalg.tail(S, perc, criterion=criterion))


def _as_list(k) -> list[int]:
    return [int(k)] if isinstance(k, int) else [int(v) for v in k.reshape(-1).tolist()]
