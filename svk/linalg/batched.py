"""Model-level SVD: many weights of mixed shapes, grouped by shape and run batched.

This is what ``svk.inject`` calls to initialise every targeted layer at once (DESIGN.md §4):

    spectra = batched_svd(weights, mode="spectrum")                     # SARA, SiVA: S only
    ranks = {name: threshold(S, tau=0.01) for name, S in spectra.items()}
    top = batched_svd(weights, mode="top", rank=ranks)                  # U, S, Vh per weight
    bottom = batched_svd(weights, mode="bottom", rank=8)                # KaSA, SiVA

Weights are grouped by (shape, device, dtype) in order of first appearance, each group is
stacked in chunks of at most ``chunk_bytes`` of working memory, and each chunk is one
batched call of ``rsvd`` / ``singular_values`` / ``bottom_svd``. Within a group, "top" runs at
the group's largest rank and "bottom" at its largest k, then slices each weight's own
triplets, so per-layer ranks (SARA) do not split groups: a rank-r prefix of a rank-R rsvd is
at least as accurate as a rank-r rsvd (its sketch is wider).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._checks import SVDResult, check_count, check_matrix, check_rank
from .rsvd import _rsvd
from .spectrum import _bottom_svd, _singular_values

_MODES = ("spectrum", "top", "bottom")
# Working memory per element of a stacked chunk: the float64 copy for "spectrum"/"bottom", the
# float32 copy for "top" (the Krylov basis and products are small next to it at rank << n).
_BYTES_PER_ELEMENT = {"spectrum": 8, "bottom": 8, "top": 4}


def batched_svd(weights, *, mode: str = "top", rank=None, oversample: int | None = None,
                n_iter: int | None = None, generator: torch.Generator | None = None,
                progress: bool = True, chunk_bytes: int = 2 << 30):
    """SVDs of many weight matrices, one batched computation per group of equal shape.

    Args:
        weights: ``dict[str, Tensor]`` or a list/tuple of 2-D floating tensors (out, in) of any
            shapes, dtypes (bf16 included) and devices. Not modified.
        mode: ``"spectrum"`` — all min(m, n) singular values (``singular_values``);
            ``"top"`` — the top-``rank`` triplets (``rsvd``); ``"bottom"`` — the bottom-``rank``
            triplets (``bottom_svd``).
        rank: for "top"/"bottom", an int for every weight, or per weight: a dict with the same
            keys as ``weights`` (dict input) or a sequence of the same length (list input).
            Must be None for "spectrum".
        oversample, n_iter, generator: passed to ``rsvd`` ("top" only). The generator is
            consumed group by group in order of first appearance, so a call is reproducible;
            a weight's factors differ from a standalone ``rsvd`` call only within rsvd's
            accuracy (its sketch is drawn as part of a stack).
        progress: show a tqdm bar counting weights.
        chunk_bytes: upper bound on the working copy of one stacked chunk (default 2 GiB); a
            group larger than that runs as several batched calls.

    Returns:
        The same container kind as ``weights`` (dict with the same keys, or list in order):
        "spectrum" gives a float32 tensor S (min(m, n),) per weight; "top"/"bottom" give
        ``SVDResult(U, S, Vh)`` per weight with U (m, r), S (r,), Vh (r, n) in float32 on the
        weight's device (see ``rsvd``/``bottom_svd`` for order and sign conventions).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    keys, tensors = _unpack(weights)
    for key, W in zip(keys, tensors):
        check_matrix(W, name=f"weights[{key!r}]")
        if W.ndim != 2:
            raise ValueError(f"weights[{key!r}] must be a 2-D matrix, got shape {tuple(W.shape)}")
    ranks = _per_weight_ranks(rank, mode, weights, keys, tensors)
    if oversample is not None:
        check_count(oversample, "oversample")
    if n_iter is not None:
        check_count(n_iter, "n_iter")
    chunk_bytes = check_count(chunk_bytes, "chunk_bytes", minimum=1)

    groups: dict[tuple, list[int]] = {}
    for i, W in enumerate(tensors):
        groups.setdefault((tuple(W.shape), W.device, W.dtype), []).append(i)

    results: list = [None] * len(tensors)
    with tqdm(total=len(tensors), desc=f"svk.linalg ({mode})", unit="weight",
              disable=not progress) as bar:
        for (shape, _, _), members in groups.items():
            per_chunk = max(1, chunk_bytes // (shape[0] * shape[1] * _BYTES_PER_ELEMENT[mode]))
            for start in range(0, len(members), per_chunk):
                chunk = members[start:start + per_chunk]
                bar.set_postfix(shape=f"{shape[0]}x{shape[1]}", batch=len(chunk))
                stack = torch.stack([tensors[i] for i in chunk])
                _run_chunk(stack, chunk, mode, ranks, oversample, n_iter, generator, results)
                del stack
                bar.update(len(chunk))

    return dict(zip(keys, results)) if isinstance(weights, Mapping) else results


def _run_chunk(stack, chunk, mode, ranks, oversample, n_iter, generator, results) -> None:
    if mode == "spectrum":
        S = _singular_values(stack)
        for j, i in enumerate(chunk):
            results[i] = S[j]
        return
    top = max(ranks[i] for i in chunk)
    if mode == "top":
        U, S, Vh = _rsvd(stack, top, oversample, n_iter, generator)
        for j, i in enumerate(chunk):
            r = ranks[i]
            results[i] = SVDResult(U[j, :, :r].contiguous(), S[j, :r].contiguous(),
                                   Vh[j, :r, :].contiguous())
    else:
        U, S, Vh = _bottom_svd(stack, top)
        for j, i in enumerate(chunk):
            k = ranks[i]
            results[i] = SVDResult(U[j, :, -k:].contiguous(), S[j, -k:].contiguous(),
                                   Vh[j, -k:, :].contiguous())


def _unpack(weights) -> tuple[list, list]:
    if isinstance(weights, Mapping):
        return list(weights.keys()), list(weights.values())
    if isinstance(weights, Sequence) and not isinstance(weights, (str, bytes, Tensor)):
        return list(range(len(weights))), list(weights)
    raise TypeError(f"weights must be a dict of tensors or a list/tuple of tensors, got "
                    f"{type(weights).__name__}")


def _per_weight_ranks(rank, mode, weights, keys, tensors) -> list:
    if mode == "spectrum":
        if rank is not None:
            raise ValueError("rank must be None for mode='spectrum' (all values are returned)")
        return [None] * len(tensors)
    if rank is None:
        raise ValueError(f"rank is required for mode={mode!r}: an int or one per weight")
    if isinstance(rank, Mapping):
        if not isinstance(weights, Mapping):
            raise TypeError("rank may be a dict only when weights is a dict")
        missing = [k for k in keys if k not in rank]
        if missing:
            raise ValueError(f"rank has no entry for weights {missing[:5]}"
                             f"{' …' if len(missing) > 5 else ''}")
        values = [rank[k] for k in keys]
    elif isinstance(rank, Sequence) and not isinstance(rank, (str, bytes)):
        if isinstance(weights, Mapping):
            raise TypeError("rank must be an int or a dict keyed like weights")
        if len(rank) != len(tensors):
            raise ValueError(f"rank has {len(rank)} entries for {len(tensors)} weights")
        values = list(rank)
    else:
        values = [rank] * len(tensors)
    return [check_rank(r, W, name=f"rank[{key!r}]") for key, r, W in zip(keys, values, tensors)]
