"""Methods that train the factors a (r, in) and b (out, r): LoRA, PiSSA, SARA, KaSA.

    LoRA   a Kaiming-uniform, b = 0, s = 1 frozen               scaling alpha/r
    PiSSA  a = diag(√S[:r])·Vh[:r], b = U[:, :r]·diag(√S[:r]),  scaling 1
           base ← W − b·a (the principal part moves into the adapter)
    SARA   rank k = threshold(S, tau) per layer (SARA Algorithm 1); a, b Kaiming-uniform,
           s = 0, all three trainable (init="v_zero": b = 0, s = 1)   scaling 1
    KaSA   base ← W − U[:, -r:]·diag(S[-r:])·Vh[-r:] (bottom r removed);
           a Kaiming-uniform, s ~ N(0, 1), b = 0, all trainable  scaling alpha/r
           plus the regulariser beta·‖s‖² + gamma·(‖a·aᵀ − I‖_F + ‖bᵀ·b − I‖_F)

Kaiming-uniform is nn.init.kaiming_uniform_(a=√5), the nn.Linear default: U(±1/√fan_in) with
fan_in the factor's second dimension (in for a (k, in), k for b (out, k)).
"""
from __future__ import annotations

import torch
from torch import Tensor

from svk.nn import _spectral
from svk.nn.base import SVLinear, adapter_dtype, kaiming_uniform, normal


def _low_rank_factors(W, ranks, *, generator, s_init, b_random=False):
    """a Kaiming-uniform (k, in), s (k,), b (out, k) for each matrix of W (n, out, in); b is 0,
    or Kaiming-uniform (fan_in k) with b_random. a is drawn before b, layer by layer."""
    _, out_features, in_features = W.shape
    dtype = adapter_dtype(W.dtype)
    draw = dict(generator=generator, device=W.device, dtype=dtype)
    layers = []
    for k in ranks:
        a = kaiming_uniform((k, in_features), in_features, **draw)
        b = (kaiming_uniform((out_features, k), k, **draw) if b_random else
             torch.zeros(out_features, k, device=W.device, dtype=dtype))
        layers.append({"a": a, "s": s_init(k, dtype), "b": b})
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
    values (Algorithm 1), then a trainable truncated-SVD-shaped update b·diag(s)·a.

    init="paper" (default): a and b Kaiming-uniform, s = 0. The paper's appendix says its
    random initialisations are Kaiming-uniform, and its ablation (Table 5, LLaMA-7B, math)
    lists zeroing the up-projection "as in the original LoRA" as a separate, worse variant
    ("V=0": average 58.85 against SARA's 62.18). The update must still start at zero, so with
    both projections random the singular values start at zero and the output equals the base
    at initialisation. At that point only s has a gradient (a and b receive s ⊙ …, which is
    0); a and b start moving after the first step.

    init="v_zero": the Table 5 "V=0" ablation, LoRA-style: a Kaiming-uniform, b = 0, s = 1.
    """

    method = "sara"
    HPARAMS = {"tau": 0.01, "init": "paper"}
    TRAINABLE = ("a", "s", "b")
    INITS = ("paper", "v_zero")

    @classmethod
    def _validate(cls, hp: dict) -> None:
        super()._validate(hp)
        if hp["init"] not in cls.INITS:
            raise ValueError(f"sara: init must be one of {cls.INITS} ('paper': a, b "
                             f"Kaiming-uniform, s = 0; 'v_zero': the Table 5 ablation b = 0, "
                             f"s = 1), got {hp['init']!r}")

    @classmethod
    def init_factors(cls, W, hp, *, generator=None):
        ranks = _spectral.threshold(_spectral.spectrum(W), hp["tau"])
        fill = 0.0 if hp["init"] == "paper" else 1.0

        def s_init(k, dtype):
            return torch.full((k,), fill, device=W.device, dtype=dtype)

        return _low_rank_factors(W, ranks, generator=generator, s_init=s_init,
                                 b_random=hp["init"] == "paper")


class KaSALinear(SVLinear):
    """KaSA (Wang et al. 2024): removes W's bottom-r singular components from the base and
    learns b·diag(s)·a in their place, with the regulariser of ``regularization_loss``.

    Fidelity (checked against PEFT 0.21.2's KaSA and the reference code juyongjiang/KaSA):

    - Base truncation: svk and PEFT follow the paper and remove the bottom r components on
      every layer. The reference code keeps the top ``in − r`` components instead
      (``svd_rank = in_features − r``): the same as the bottom r when in ≤ out, but on a layer
      with in > out it removes only max(0, r − (in − out)) components, i.e. nothing on a
      typical MLP down-projection (in = 4·out).
    - Regulariser: ``regularization_loss()`` (form="paper") is the paper's r×r form and equals
      PEFT's per-layer loss exactly; ``svk.regularization_loss(model, reduction="sum")``
      equals PEFT's ``_get_kasa_loss``. The reference code instead uses in×in and out×out
      Gram matrices, ‖aᵀ·a − I_in‖_F + ‖b·bᵀ − I_out‖_F, and divides the sum over layers by
      the number of layers: ``form="reference"`` here with ``reduction="mean"``. The two forms
      differ by a constant inside each norm (‖aᵀa − I_in‖² = ‖aaᵀ − I_r‖² + in − r), so they
      have different values and gradients. Measured on MiniLM-L6's 12 query/value layers (r = 8,
      defaults beta 1e-4, gamma 1e-3, averaged over layers): at initialisation paper 0.0054,
      reference 0.0398 (7.4×); after a small perturbation (b ~ N(0, 0.05), a += 0.01·N(0, 1))
      paper 0.0029, reference 0.0396 (13.6×: the forms differ by 93 % of the reference value).
    - Scaling alpha/r and the init (s ~ N(0, 1), a Kaiming-uniform, b = 0) are PEFT's.
    """

    method = "kasa"
    HPARAMS = {"rank": 8, "alpha": 16.0, "beta": 1e-4, "gamma": 1e-3}
    TRAINABLE = ("a", "s", "b")
    FORMS = ("paper", "reference")

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

    def regularization_loss(self, form: str = "paper") -> Tensor:
        """beta·‖s‖² + gamma·orthogonality, in fp32.

        form="paper": orthogonality = ‖a·aᵀ − I_r‖_F + ‖bᵀ·b − I_r‖_F (KaSA Eq. 9–11; the same
        per-layer value as PEFT's ``_kasa_layer_regularization_loss``).
        form="reference": orthogonality = ‖aᵀ·a − I_in‖_F + ‖b·bᵀ − I_out‖_F, as the KaSA
        reference code's ``loss_fn`` computes it (which then averages over layers). Evaluated
        through ‖aᵀa − I_in‖² = ‖aaᵀ − I_r‖² + (in − r), so no in×in matrix is formed.
        """
        if form not in self.FORMS:
            raise ValueError(f"form must be one of {self.FORMS}, got {form!r}")
        s, a, b = self.s.float(), self.a.float(), self.b.float()
        r = s.shape[0]
        eye = torch.eye(r, device=s.device, dtype=torch.float32)
        a_gram, b_gram = a @ a.t() - eye, b.t() @ b - eye
        if form == "paper":
            orthogonality = torch.linalg.norm(a_gram) + torch.linalg.norm(b_gram)
        else:
            orthogonality = (torch.sqrt(a_gram.square().sum() + (self.in_features - r))
                             + torch.sqrt(b_gram.square().sum() + (self.out_features - r)))
        return self.beta * (s * s).sum() + self.gamma * orthogonality
