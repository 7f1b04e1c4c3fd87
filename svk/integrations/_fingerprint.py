"""The base-weight fingerprint of adapter files (format 2): a small float64 sketch Pᵀ·W·Q.

P (out, PROBES) and Q (in, PROBES) are ±1 matrices from an integer hash (_probe), never from a
random number generator, so a file written on one machine and torch version verifies on any
other. PROBES = 8 gives 64 numbers per layer; with ±1 probes E[(pᵀ·E·q)²] = ‖E‖²_F, so the
distance of two sketches measures the Frobenius distance of the two weights (×PROBES).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

PROBES = 8                       # the sketch is PROBES × PROBES numbers per layer
_BLOCK_BYTES = 64 << 20          # float64 row block of W while sketching
_MASK = 0xFFFFFFFF


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps/2: 2⁻⁸ bf16, 2⁻¹¹ fp16, 2⁻²⁴ fp32, 2⁻⁵³ fp64."""
    return torch.finfo(dtype).eps / 2


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2³² for int64 x in [0, 2³²), without int64 overflow (16-bit halves)."""
    low = (x & 0xFFFF) * c
    high = ((x >> 16) * c) & 0xFFFF
    return (low + (high << 16)) & _MASK


def _probe(n: int, which: int) -> Tensor:
    """(n, PROBES) float64 matrix of ±1 from the 32-bit "lowbias32" integer hash of
    (row, column, which): deterministic integer arithmetic, so every machine and torch version
    draws the same probes (a torch RNG stream is not promised to stay the same)."""
    index = (torch.arange(n, dtype=torch.int64)[:, None] * PROBES
             + torch.arange(PROBES, dtype=torch.int64)[None, :]) * 2 + which
    x = (index ^ 0x5BD1E995) & _MASK
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return 1.0 - 2.0 * ((x >> 31) & 1).to(torch.float64)


def sketch(weight: Tensor, removed: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, float]:
    """(Pᵀ·W·Q as a (PROBES, PROBES) float64 CPU tensor, ‖W‖_F) of W = weight + b·a, where
    removed = (b, a) is the low-rank part KaSA/PiSSA took out of the base (None otherwise):
    the fingerprint of the original base weight. float64 in row blocks of at most 64 MiB,
    on the weight's device (one pass over W; no TF32, no full-size temporary)."""
    out_features, in_features = weight.shape
    device = weight.device if weight.device.type != "mps" else torch.device("cpu")
    p, q = _probe(out_features, 0).to(device), _probe(in_features, 1).to(device)
    if removed is not None:
        removed_b, removed_a = (t.detach().to(device, torch.float64) for t in removed)
    result = torch.zeros(PROBES, PROBES, dtype=torch.float64, device=device)
    squares = torch.zeros((), dtype=torch.float64, device=device)
    rows = max(1, _BLOCK_BYTES // (8 * max(in_features, 1)))
    for start in range(0, out_features, rows):
        block = weight[start:start + rows].detach().to(device, torch.float64)
        if removed is not None:
            block = block + removed_b[start:start + rows] @ removed_a
        result += p[start:start + rows].t() @ (block @ q)
        squares += torch.linalg.vector_norm(block).square()   # no (rows, in) temporary
    return result.cpu(), math.sqrt(float(squares))
