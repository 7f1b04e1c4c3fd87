"""Methods that keep W's own singular vectors frozen and train something small between them:
LoRA-XS, SiVA, Mo-SARA.

    LoRA-XS  a = Vh[:r], s = S[:r], b = U[:, :r] frozen; trains core (r, r) ~ N(0, 1e-5²)
             scaling alpha/r
    SiVA     k = tail(S, perc, criterion="energy") per layer; a = Vh[-k:], b = U[:, -k:]
             frozen; trains s (k,), the change of W's k smallest singular values, from 0
                                                                                  scaling 1
    Mo-SARA  k = threshold(S, tau) per layer; a = Vh[:k], b = U[:, :k] frozen (no S); trains
             lambdas (m, k) Kaiming-uniform (bound 1/√k), the rank-1 router gate_in (k,),
             gate_out (m,) (nn.Linear init) and out_scale (out,) = 0             scaling 1
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from svk.nn import _spectral
from svk.nn.base import SVLinear, adapter_dtype, kaiming_uniform, normal, uniform
from svk.ops import _checks, _dispatch
from svk.ops.sv_mixture_linear import run as _run_mixture
from svk.ops.sv_mixture_linear import sv_mixture_linear


class LoRAXSLinear(SVLinear):
    """LoRA-XS (Bałazy et al. 2024): only an r×r core between W's frozen top-r singular
    vectors trains (r² parameters per layer).

    ΔW = (alpha/r)·b·core·diag(s)·a with b = U[:, :r], s = S[:r], a = Vh[:r]: the official
    code's B·R·A with S folded into A (A = diag(S)·Vh) and core in R's place (core = D·R·D for
    the sign flips D between the two SVDs; see svk.integrations.official).

    alpha is per task in the official code (MohammadrezaBanaei/LoRA-XS); the default 16 is its
    GLUE setting (``main_glue.py``, paper App. "We fix the LoRA-XS scaling factor α to 16"), so
    the scaling shrinks as the rank grows (rank 64 gives 0.25). Its other scripts use:

        GLUE (RoBERTa-large, r 4–25)            alpha = 16         scaling 16/r
        math (MetaMathQA → GSM8K/MATH, r 64)    alpha = r          scaling 1   (main_math_tuning.py)
        commonsense (LLaMA2/3, r 32)            alpha = 2r = 64    scaling 2   (paper App. C.2)

    Checkpoints trained with the official code load with
    ``svk.integrations.official.load_lora_xs_official``."""

    method = "lora_xs"
    HPARAMS = {"rank": 16, "alpha": 16.0}
    TRAINABLE = ("core",)

    @classmethod
    def init_factors(cls, W, hp, *, generator=None):
        r = hp["rank"]
        U, S, Vh = _spectral.top(W, r, generator=generator)
        dtype = adapter_dtype(W.dtype)
        return [{"a": Vh[i].to(dtype), "s": S[i].to(dtype), "b": U[i].to(dtype),
                 "core": normal((r, r), 1e-5, generator=generator, device=W.device,
                                dtype=dtype)}
                for i in range(W.shape[0])]

    @classmethod
    def scaling_for(cls, hp, rank):
        return hp["alpha"] / rank


class SiVALinear(SVLinear):
    """SiVA: trains only the change of W's k smallest singular values, along W's own
    singular vectors; k per layer from ``perc`` (tail rule).

    criterion="energy" (default) measures the tail in squared singular values, as the paper's
    method section defines k: the values "that capture the bottom (1 − perc)% of the
    variance". criterion="sum" measures plain singular values, as its conclusion words it
    ("cumulative sum of singular values"). The paper's own parameter counts side with the
    variance: at perc 0.95 on query/value they imply that k is 52.6 % of the singular values
    on ViT-B (9.7K of 12·2·768), 61.6 % on ViT-L (30.3K of 24·2·1024) and 46.8 % on
    RoBERTa-large (23K of 24·2·1024). On MiniLM-L6's 12 query/value matrices (384×384) at
    perc 0.95, "energy" picks 49.7 % (172–203 per layer) and "sum" 28.9 % (101–120).
    """

    method = "siva"
    HPARAMS = {"perc": 0.95, "criterion": "energy"}
    TRAINABLE = ("s",)

    @classmethod
    def init_factors(cls, W, hp, *, generator=None):
        ranks = _spectral.tail(_spectral.spectrum(W), hp["perc"], hp["criterion"])
        U, _, Vh = _spectral.bottom(W, max(ranks))
        dtype = adapter_dtype(W.dtype)
        # bottom() returns the last k_max triplets in descending order: a layer's bottom k are
        # the last k of them.
        return [{"a": Vh[i, -k:].to(dtype), "b": U[i, :, -k:].to(dtype),
                 "s": torch.zeros(k, device=W.device, dtype=dtype)}
                for i, k in enumerate(ranks)]


class MoSARALinear(SVLinear):
    """Mo-SARA: m heads of singular values mixed per token by a rank-1 router (Eq. 5–6),
    between W's frozen top-k singular vectors, times a trainable per-output scale.

    Set ``record_gates = True`` to keep the last forward's mean router gate per head in
    ``last_gates`` (m,), for inspection and plots."""

    method = "mosara"
    HPARAMS = {"tau": 0.5, "heads": 5}
    TRAINABLE = ("lambdas", "gate_in", "gate_out", "out_scale")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.record_gates = False
        self.last_gates: Tensor | None = None

    @classmethod
    def init_factors(cls, W, hp, *, generator=None):
        ranks = _spectral.threshold(_spectral.spectrum(W), hp["tau"])
        U, _, Vh = _spectral.top(W, max(ranks), generator=generator)
        m = hp["heads"]
        dtype = adapter_dtype(W.dtype)
        draw = dict(generator=generator, device=W.device, dtype=dtype)
        return [{"a": Vh[i, :k].to(dtype), "b": U[i, :, :k].to(dtype),
                 # the paper's random inits are Kaiming-uniform (appendix): fan_in k
                 "lambdas": kaiming_uniform((m, k), k, **draw),
                 # like nn.Linear(k, 1).weight and nn.Linear(1, m).weight
                 "gate_in": uniform((k,), 1.0 / math.sqrt(k), **draw),
                 "gate_out": uniform((m,), 1.0, **draw),
                 "out_scale": torch.zeros(W.shape[1], device=W.device, dtype=dtype)}
                for i, k in enumerate(ranks)]

    @property
    def heads(self) -> int:
        return self.lambdas.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        args = self._validated
        if self.adapter_disabled:
            return F.linear(x, self.weight, self.bias)
        if args is None or self.record_gates or _dispatch.autocast_dtype(x) is not None:
            return self._checked_forward(x)
        # Validated once (below); per call only x, as SVLinear.forward.
        _checks.activation(x, args[0])
        return _run_mixture(x, *args, False, self.dropout if self.training else 0.0)

    def _checked_forward(self, x: Tensor) -> Tensor:
        y, gates = _mixture(x, self.weight, self.a, self.lambdas, self.gate_in, self.gate_out,
                            self.b, bias=self.bias, out_scale=self.out_scale,
                            scaling=self.scaling, backend=self.backend,
                            return_gates=self.record_gates,
                            dropout=self.dropout if self.training else 0.0)
        self._validated = (self.weight, self.a, self.lambdas, self.gate_in, self.gate_out,
                           self.b, self.bias, self.out_scale, float(self.scaling), self.backend)
        if self.record_gates:
            self.last_gates = gates.detach().float().reshape(-1, self.heads).mean(0)
        return y

    def delta_weight(self) -> Tensor:
        raise RuntimeError("Mo-SARA's update depends on each token through its router gate, so "
                           "it has no single delta weight and cannot be merged")

    def merge(self, exact: bool = True) -> None:
        raise RuntimeError("Mo-SARA cannot be merged: its update depends on each token through "
                           "the router gate (Eq. 6), so no single weight reproduces it")

    def unmerge(self) -> None:
        raise RuntimeError("Mo-SARA layers are never merged")


def _mixture(x, weight, a, lambdas, gate_in, gate_out, b, *, bias, out_scale, scaling, backend,
             return_gates, dropout=0.0):
    """One call of the fused Mo-SARA op; (y, gates (…, m) or None)."""
    out = sv_mixture_linear(x, weight, a, lambdas, gate_in, gate_out, b, bias=bias,
                            out_scale=out_scale, scaling=scaling, backend=backend,
                            return_gates=return_gates, dropout=dropout)
    return out if return_gates else (out, None)
