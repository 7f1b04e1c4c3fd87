"""Methods that train the factors a (r, in) and b (out, r): LoRA, PiSSA, SARA, KaSA.

    LoRA   a Kaiming-uniform, b = 0, s = 1 frozen               scaling alpha/r
    PiSSA  a = diag(√S[:r])·Vh[:r], b = U[:, :r]·diag(√S[:r]),  scaling 1
           base ← W − b·a (the principal part moves into the adapter)
    SARA   rank k = threshold(S, tau) per layer (SARA Algorithm 1); a Kaiming-uniform, s = 1,
           b = 0, all three trainable                            scaling 1
    KaSA   base ← W − U[:, -r:]·diag(S[-r:])·Vh[-r:] (bottom r removed);
           a Kaiming-uniform, s ~ N(0, 1), b = 0, all trainable  scaling alpha/r
           plus the regulariser beta·‖s‖² + gamma·(‖a·aᵀ − I‖_F + ‖bᵀ·b − I‖_F)
"""
from __future__ import annotations

import torch
from torch import Tensor

from svk.nn import _spectral
from svk.nn.base import SVLinear, adapter_dtype, kaiming_uniform, normal


def _low_rank_factors(W, ranks, *, generator, s_init):
    """a Kaiming-uniform (k, in), s (k,), b = 0 (out, k) for each matrix of W (n, out, in)."""
    _, out_features, in_features = W.shape
    dtype = adapter_dtype(W.dtype)
    layers = []
    for k in ranks:
        layers.append({
            "a": kaiming_uniform((k, in_features), in_features, generator=generator,
                                 device=W.device, dtype=dtype),
            "s": s_init(k, dtype),
            "b": torch.zeros(out_features, k, device=W.device, dtype=dtype),
        })
    return layers


class LoRALinear(SVLinear):
    """LoRA (Hu et al. 2022) as an SVLinear: trains a and b, s = 1 is frozen."""

    method = "lora"
    HPARAMS = {"rank": 8, "alpha": 16.0}
    TRAINABLE = ("a", "b")

    @classmethod
    def init_factors(cls, W, hp, *, generator=None):
        ones = lambda k, dtype: torch.ones(k, device=W.device, dtype=dtype)  # noqa: E731
        return _low_rank_factors(W, [hp["rank"]] * W.shape[0], generator=generator, s_init=ones)

    @classmethod
    def scaling_for(cls, hp, rank):
        return hp["alpha"] / rank


class PiSSALinear(SVLinear):
    """PiSSA (Meng et al. 2024): the adapter starts as the principal rank-r part of W and the
    base keeps the residual, so residual + delta_weight() = W at init."""

    method = "pissa"
    HPARAMS = {"rank": 8}
    TRAINABLE = ("a", "b")

    @classmethod
    def init_factors(cls, W, hp, *, generator=None):
        r = hp["rank"]
        U, S, Vh = _spectral.top(W, r, generator=generator)
        root = S.sqrt()
        a = root[..., :, None] * Vh                    # (n, r, in)
        b = U * root[..., None, :]                     # (n, out, r)
        residual = (W.float() - b @ a).to(W.dtype)
        dtype = adapter_dtype(W.dtype)
        return [{"weight": residual[i], "a": a[i].to(dtype), "b": b[i].to(dtype),
                 "s": torch.ones(r, device=W.device, dtype=dtype),
                 "base_removed": (b[i].float(), a[i].float())} for i in range(W.shape[0])]


class SARALinear(SVLinear):
    """SARA (Gu et al.): per-layer rank k from the threshold tau on the cumulative singular
    values (Algorithm 1), then a trainable truncated-SVD-shaped update b·diag(s)·a."""

    method = "sara"
    HPARAMS = {"tau": 0.01}
    TRAINABLE = ("a", "s", "b")

    @classmethod
    def init_factors(cls, W, hp, *, generator=None):
        ranks = _spectral.threshold(_spectral.spectrum(W), hp["tau"])
        ones = lambda k, dtype: torch.ones(k, device=W.device, dtype=dtype)  # noqa: E731
        return _low_rank_factors(W, ranks, generator=generator, s_init=ones)


class KaSALinear(SVLinear):
    """KaSA (Wang et al. 2024): removes W's bottom-r singular components from the base and
    learns b·diag(s)·a in their place, with the regulariser of ``regularization_loss``."""

    method = "kasa"
    HPARAMS = {"rank": 8, "alpha": 16.0, "beta": 1e-4, "gamma": 1e-3}
    TRAINABLE = ("a", "s", "b")

    @classmethod
    def init_factors(cls, W, hp, *, generator=None):
        r = hp["rank"]
        if r >= min(W.shape[-2:]):
            raise ValueError(f"KaSA needs rank < min(out, in) = {min(W.shape[-2:])} so that the "
                             f"truncated base keeps a component, got rank={r}")
        U, S, Vh = _spectral.bottom(W, r)
        removed_b = U * S[..., None, :]                  # (n, out, r)
        truncated = (W.float() - removed_b @ Vh).to(W.dtype)

        def s_init(k, dtype):
            return normal((k,), 1.0, generator=generator, device=W.device, dtype=dtype)

        layers = _low_rank_factors(W, [r] * W.shape[0], generator=generator, s_init=s_init)
        for i, layer in enumerate(layers):
            layer["weight"] = truncated[i]
            layer["base_removed"] = (removed_b[i].float(), Vh[i].float())
        return layers

    @classmethod
    def scaling_for(cls, hp, rank):
        return hp["alpha"] / rank

    @property
    def beta(self) -> float:
        return self.hparams["beta"]

    @property
    def gamma(self) -> float:
        return self.hparams["gamma"]

    def regularization_loss(self) -> Tensor:
        """beta·‖s‖² + gamma·(‖a·aᵀ − I‖_F + ‖bᵀ·b − I‖_F), in fp32 (KaSA Eq. 9–11; the
        same per-layer form as PEFT's ``_kasa_layer_regularization_loss``)."""
        s, a, b = self.s.float(), self.a.float(), self.b.float()
        eye = torch.eye(s.shape[0], device=s.device, dtype=torch.float32)
        orthogonality = torch.linalg.norm(a @ a.t() - eye) + torch.linalg.norm(b.t() @ b - eye)
        return self.beta * (s * s).sum() + self.gamma * orthogonality
