"""The naive oracle: plain PyTorch versions of the three ops of DESIGN.md §2.

Written the obvious way on purpose (LoRA-XS as three linear maps, Mo-SARA per head as its
Eq. 5, the bank as a loop over adapters), each intermediate a full tensor that autograd keeps.
Tests evaluate them in float64; benchmarks use them as the baseline. Nothing on a hot path
imports this module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _adapter_dtype_cast(x, *tensors):
    return [None if t is None else t.to(x.dtype) for t in tensors]


def sv_linear(x, weight, a, s, b, *, bias=None, core=None, out_scale=None, scaling=1.0,
              backend="torch"):
    """y = x·Wᵀ + bias + scaling·(((x·aᵀ)·s)·coreᵀ·bᵀ)·out_scale, as separate linear maps."""
    a, s, b, core, out_scale = _adapter_dtype_cast(x, a, s, b, core, out_scale)
    y = F.linear(x, weight, bias)
    t = F.linear(x, a)
    u = t * s
    if core is not None:
        u = F.linear(u, core)
    delta = F.linear(u, b) * scaling
    if out_scale is not None:
        delta = delta * out_scale
    return y + delta


def sv_mixture_linear(x, weight, a, lambdas, gate_in, gate_out, b, *, bias=None, out_scale=None,
                      scaling=1.0, backend="torch"):
    """Mo-SARA Eq. 5–6 literally: m per-head (M, out) products weighted by the router."""
    a, lambdas, gate_in, gate_out, b, out_scale = _adapter_dtype_cast(
        x, a, lambdas, gate_in, gate_out, b, out_scale)
    y = F.linear(x, weight, bias)
    t = F.linear(x, a)
    logits = (t @ gate_in).unsqueeze(-1) * gate_out          # Eq. 6: rank-1 router
    g = torch.softmax(logits, dim=-1)
    delta = 0
    for i in range(lambdas.shape[0]):                         # Eq. 5: one product per head
        delta = delta + g[..., i:i + 1] * F.linear(t * lambdas[i], b)
    delta = delta * scaling
    if out_scale is not None:
        delta = delta * out_scale
    return y + delta


def sv_bank_linear(x, weight, a, s, b, cores, adapter_ids, *, bias=None, scaling=1.0,
                   backend="torch"):
    """Many LoRA-XS adapters in one batch, one masked pass per distinct adapter (PEFT-style)."""
    a, s, b, cores = _adapter_dtype_cast(x, a, s, b, cores)
    if adapter_ids.dim() == 1 and x.dim() > 2 and adapter_ids.shape[0] == x.shape[0]:
        adapter_ids = adapter_ids.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
    y = F.linear(x, weight, bias)
    for adapter in torch.unique(adapter_ids).tolist():
        if adapter < 0:
            continue
        rows = (adapter_ids == adapter).unsqueeze(-1).to(x.dtype)
        delta = F.linear(F.linear(F.linear(x, a) * s, cores[adapter]), b) * scaling
        y = y + rows * delta
    return y
