"""Adapter layers on quantized base layers (QLoRA-style; DESIGN.md §8).

Supported bases (each an nn.Linear subclass, found by svk.inject like any Linear):

    bitsandbytes.nn.Linear8bitLt   int8 codes + per-row scales (SCB), after quantization
    bitsandbytes.nn.Linear4bit     nf4 or fp4 codes + blockwise absmax (quant_state)
    torch.nn.Linear with a torchao weight (torchao.quantization.quantize_, e.g.
                                   Int8WeightOnlyConfig: an Int8Tensor weight)

A quantized layer ``QuantizedLoRAXSLinear`` etc. (one per method of svk.nn.METHODS, from
``quantized_class(cls)``) holds the quantized module untouched as ``base_layer`` — its codes are
never written, no dense (out, in) copy is kept — plus the method's adapter tensors:

    y = base_layer(x) + scaling·(((x·aᵀ) ⊙ s)·coreᵀ·bᵀ) ⊙ out_scale     (svk.ops.sv_delta)

The base product is the quantizer's own forward (its kernel, its rounding); autograd carries
dx through it. Initialisation takes the factors from the dequantized weight (codes times their
scales, as the quantizer's own dequantize), batched per shape by svk.inject as for dense bases.

KaSA and PiSSA rewrite the base (W ← W − b0·a0). Requantizing the residual would change the
codes and add a second quantization error, so the quantized layer keeps the codes and
subtracts the frozen rank-r part on the fly instead (one more rank-r term in the same addmm):
y = base_layer(x) − (x·a0ᵀ)·b0ᵀ + adapter, exactly the method applied to the dequantized
weight. (This is not QPiSSA, which quantizes the residual to lower the quantization error.)

What differs from a dense SVLinear:

- ``weight`` is a read-only property: the effective frozen base, dequantize(W) (minus b0·a0 for
  KaSA/PiSSA), computed on each access and never stored — for fingerprints and exports, not
  for a hot path. ``bias`` is ``base_layer.bias``. ``original_weight()`` is dequantize(W).
- ``merge()`` refuses: folding the update in would requantize the base (new codes, a second
  rounding error). ``svk.unload(model, merge=False)`` gives the quantized layers back;
  ``svk.export_peft`` writes the update as a PEFT LoRA on the same quantized base (QLoRA).
- ``disable_adapter`` gives ``base_layer(x)``.
- The adapter path is PyTorch (rank-r work next to the quantizer's GEMM); ``backend`` is kept
  for the record. Adapter dropout uses torch's dropout (its mask is stored by autograd).
- A bitsandbytes Linear4bit base stays in training mode (``train()``/``eval()`` leave it so):
  bitsandbytes 0.50.2 on AVX512-BF16 CPUs repacks the codes in place at the first eval-mode
  no-grad forward (block scales rounded to bf16, irreversibly), then computes in bf16 (measured
  3·10⁻³ relative on a 64×64 layer), dequantize_4bit misreads the new layout, and a later
  forward no longer carries gradients to its input. Its training flag has no other effect.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from svk.nn.base import SVLinear, linear_weight
from svk.ops.sv_delta import sv_delta, sv_mixture_delta


# ---- recognising and dequantizing quantized layers --------------------------------------------
def _bnb_kind(module: nn.Module) -> str | None:
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:             # nothing can be a bitsandbytes layer unless it was imported
        return None
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    return None


def _torchao_weight(module: nn.Module) -> bool:
    if "torchao" not in sys.modules or not isinstance(module, nn.Linear):
        return False
    from torchao.utils import TorchAOBaseTensor
    return isinstance(module.weight, TorchAOBaseTensor) and hasattr(module.weight, "dequantize")


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes Linear8bitLt / Linear4bit or an nn.Linear with a torchao
    quantized weight."""
    return _bnb_kind(module) is not None or _torchao_weight(module)


def _not_quantized_yet(module: nn.Module, how: str) -> TypeError:
    return TypeError(f"{type(module).__name__} holds no quantized weight yet ({how}); "
                     "bitsandbytes quantizes when the layer is moved to its device (e.g. "
                     "model.to('cpu') or .cuda() after loading the weights); quantize first, then "
                     "svk.inject")


def dequantize(module: nn.Module) -> Tensor:
    """The (out, in) weight the quantized layer computes with: its codes times their scales,
    with the quantizer's own dequantize (never the raw integer codes), detached."""
    kind = _bnb_kind(module)
    with torch.no_grad():
        if kind == "int8":
            import bitsandbytes.functional as bnbf
            w = module.weight
            # The row scales are on the weight until the first forward, which moves them to
            # the layer's matmul state (Linear8bitLt.init_8bit_state).
            scb = getattr(w, "SCB", None)
            if scb is None:
                scb = getattr(getattr(module, "state", None), "SCB", None)
            if w.dtype != torch.int8 or scb is None:
                raise _not_quantized_yet(module, f"weight dtype {w.dtype}, no SCB scales")
            return bnbf.int8_vectorwise_dequant(w.data, scb).reshape(
                module.out_features, module.in_features)
        if kind == "4bit":
            import bitsandbytes.functional as bnbf
            w = module.weight
            if getattr(w, "quant_state", None) is None:
                raise _not_quantized_yet(module, f"weight dtype {w.dtype}, no quant_state")
            if getattr(w.quant_state, "packing_format_for_cpu", False):
                raise TypeError(
                    f"{type(module).__name__}: bitsandbytes has repacked this layer's codes for "
                    "AVX512-BF16 CPU inference (it does so in place at the first eval-mode, "
                    "no-grad forward, rounding the block scales to bf16); dequantize_4bit "
                    "cannot read that layout. Inject before running the model in eval mode on "
                    "CPU, or reload/requantize it")
            return bnbf.dequantize_4bit(w.data, w.quant_state).reshape(
                module.out_features, module.in_features)
        if _torchao_weight(module):
            return module.weight.dequantize()
    raise TypeError(f"{type(module).__name__} is not a supported quantized layer "
                    "(bitsandbytes Linear8bitLt / Linear4bit, or nn.Linear with a torchao weight)")


def _dequantized_dtype(module: nn.Module) -> torch.dtype:
    """The dtype dequantize(module) returns, without dequantizing."""
    kind = _bnb_kind(module)
    if kind == "int8":
        return torch.float32            # int8_vectorwise_dequant computes in fp32
    if kind == "4bit":
        state = getattr(module.weight, "quant_state", None)
        return state.dtype if state is not None else torch.float32
    return module.weight.dtype          # torchao tensors report their original dtype


def base_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(W (out, in), bias) of any layer svk adapts: the dense weight of an nn.Linear / Conv1D
    (svk.nn.base.linear_weight) or the dequantized weight of a quantized layer."""
    if is_quantized(module):
        return dequantize(module), module.bias
    return linear_weight(module)


def weight_spec(module: nn.Module) -> tuple[tuple[int, int], torch.dtype, torch.device]:
    """((out, in), dtype, device) of base_weight(module), without dequantizing."""
    if is_quantized(module):
        device = module.weight.device
        return (module.out_features, module.in_features), _dequantized_dtype(module), device
    weight = linear_weight(module)[0]
    return tuple(weight.shape), weight.dtype, weight.device


# ---- the quantized method layers --------------------------------------------------------------
class QuantizedSVLinear:
    """Mixin placed before a method class (``quantized_class``): the base is ``base_layer``,
    a quantized module, instead of a dense weight. See the module docstring."""

    def __init__(self, base_layer: nn.Module, *, scaling: float = 1.0, trainable=None,
                 backend: str = "auto", hparams: dict | None = None,
                 base_removed: tuple[Tensor, Tensor] | None = None, dropout: float = 0.0,
                 **tensors: Tensor | None):
        if not is_quantized(base_layer):
            raise TypeError(f"{type(self).__name__} needs a quantized base layer (bitsandbytes "
                            f"Linear8bitLt / Linear4bit, torchao), got "
                            f"{type(base_layer).__name__}; use {type(self).__mro__[2].__name__} "
                            "for a dense layer")
        shape = (base_layer.out_features, base_layer.in_features)
        extra = {"dropout": dropout} if dropout else {}
        # SVLinear registers its weight argument as a parameter; a meta placeholder (no
        # memory) is passed and removed: the base lives in base_layer.
        super().__init__(torch.empty(shape, device="meta"), None, scaling=scaling,
                         trainable=trainable, backend=backend, hparams=hparams,
                         base_removed=base_removed, **extra, **tensors)
        del self._parameters["weight"]
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self._keep_base_training()

    def _keep_base_training(self) -> None:
        # In eval mode bitsandbytes would repack a Linear4bit's codes in place on AVX512-BF16
        # CPUs (module docstring); its training flag has no other use, so it stays True.
        if _bnb_kind(self.base_layer) == "4bit":
            self.base_layer.training = True

    def train(self, mode: bool = True):
        super().train(mode)
        self._keep_base_training()
        return self

    def __setattr__(self, name, value):
        if name in ("weight", "bias") and "base_layer" in self.__dict__.get("_modules", ()):
            raise AttributeError(f"{type(self).__name__}.{name} belongs to the quantized "
                                 "base_layer (weight: dequantized on access); it cannot be "
                                 "assigned")
        super().__setattr__(name, value)

    # weight and bias are views of base_layer, never stored on the layer itself.
    @property
    def weight(self) -> Tensor:
        """The effective frozen base (out, in): dequantize(base_layer) (− b0·a0 for KaSA and
        PiSSA), computed on each access, never stored."""
        weight = dequantize(self.base_layer)
        if self.base_removed_b is None:
            return weight
        dtype = torch.promote_types(weight.dtype, torch.float32)
        return torch.addmm(weight.to(dtype), self.base_removed_b.to(dtype),
                           self.base_removed_a.to(dtype), alpha=-1.0).to(weight.dtype)

    @weight.setter
    def weight(self, value):
        raise AttributeError(f"{type(self).__name__}.weight belongs to the quantized "
                             "base_layer (dequantized on access); it cannot be assigned")

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @bias.setter
    def bias(self, value):
        # Reached only from SVLinear.__init__ (bias = None; __setattr__ refuses afterwards).
        if value is not None:
            raise AttributeError(f"{type(self).__name__}.bias is base_layer.bias")

    @classmethod
    def from_linear(cls, linear: nn.Module, *, backend: str = "auto",
                    generator: torch.Generator | None = None, dropout: float = 0.0,
                    **hparams) -> "QuantizedSVLinear":
        """Wraps a quantized layer; factors from its dequantized weight."""
        hp = cls.resolve_hparams(**hparams)
        factors = cls.init_factors(dequantize(linear)[None], hp, generator=generator)[0]
        return cls.build_quantized(linear, factors, hp, backend=backend, dropout=dropout)

    @classmethod
    def build_quantized(cls, base_layer: nn.Module, factors: dict, hp: dict, *,
                        backend: str = "auto", dropout: float = 0.0) -> "QuantizedSVLinear":
        factors = dict(factors)
        # KaSA/PiSSA's residual base (dense, from the dequantized weight) is not kept: the
        # codes stay, and the removed part b0·a0 is subtracted in forward.
        factors.pop("weight", None)
        removed = factors.pop("base_removed", None)
        return cls(base_layer, scaling=cls.scaling_for(hp, factors["a"].shape[0]),
                   backend=backend, hparams=hp, base_removed=removed, dropout=dropout,
                   **factors)

    @classmethod
    def build(cls, *args, **kwargs):
        raise TypeError(f"{cls.__name__} wraps a quantized module: use "
                        f"{cls.__name__}.build_quantized(base_layer, factors, hp) or from_linear")

    # ---- forward ------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.adapter_disabled:
            return y
        p = getattr(self, "dropout", 0.0)
        xa = F.dropout(x, p, training=True) if p and self.training else x
        if self.lambdas is not None:
            record = getattr(self, "record_gates", False)
            out = sv_mixture_delta(xa, y, self.a, self.lambdas, self.gate_in, self.gate_out,
                                   self.b, out_scale=self.out_scale, scaling=self.scaling,
                                   return_gates=record)
            if not record:
                return out
            y, gates = out
            self.last_gates = gates.float().reshape(-1, self.lambdas.shape[0]).mean(0)
            return y
        return sv_delta(xa, y, self.a, self.s, self.b, core=self.core, out_scale=self.out_scale,
                        scaling=self.scaling, removed_a=self.base_removed_a,
                        removed_b=self.base_removed_b)

    # ---- base weights -------------------------------------------------------------------
    def _compute_dtype(self) -> torch.dtype:
        return torch.promote_types(_dequantized_dtype(self.base_layer), torch.float32)

    def original_weight(self) -> Tensor:
        """dequantize(base_layer) in the compute dtype: the base the adapter was built on (the
        codes are never rewritten, KaSA/PiSSA included)."""
        return dequantize(self.base_layer).to(self._compute_dtype())

    def base_weight_without_adapter(self) -> Tensor:
        return dequantize(self.base_layer)

    def regularization_loss(self, *args, **kwargs) -> Tensor:
        impl = super().regularization_loss
        if getattr(impl, "__func__", None) is SVLinear.regularization_loss:
            return self.a.new_zeros((), dtype=torch.float32)   # not self.weight: no dequantize
        return impl(*args, **kwargs)

    # ---- merging ------------------------------------------------------------------------
    def merge(self, exact: bool = True) -> None:
        raise RuntimeError(
            f"{type(self).__name__} has a quantized base ({type(self.base_layer).__name__}): "
            "merging would requantize it, writing new codes and adding a second quantization "
            "error on top of the adapter, so svk refuses. Keep the adapter unmerged (forward is "
            "the quantized GEMM plus a rank-r term), export it with svk.export_peft (a PEFT LoRA "
            "on the same quantized base), or merge into a dense copy: "
            "layer.original_weight() + layer.delta_weight()")

    def unmerge(self) -> None:
        raise RuntimeError(f"{type(self).__name__} is never merged (quantized base)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base={type(self.base_layer).__name__}"


_CLASSES: dict = {}


def quantized_class(cls: type) -> type:
    """The quantized variant of a method class (svk.nn.LoRAXSLinear -> QuantizedLoRAXSLinear)."""
    if issubclass(cls, QuantizedSVLinear):
        return cls
    if not issubclass(cls, SVLinear):
        raise TypeError(f"expected an svk.nn.SVLinear subclass, got {cls!r}")
    made = _CLASSES.get(cls)
    if made is None:
        made = _CLASSES[cls] = type(f"Quantized{cls.__name__}", (QuantizedSVLinear, cls),
                                    {"__module__": __name__,
                                     "__doc__": f"{cls.__name__} on a quantized base_layer "
                                                "(svk.nn.quantized)."})
    return made


class _Builder:
    """Stands in for a method class in svk.inject's build loop for one quantized module."""

    def __init__(self, cls: type, module: nn.Module):
        self.cls, self.module = quantized_class(cls), module

    def build(self, weight, bias, factors, hp, *, backend="auto", from_conv1d=False,
              dropout=0.0):
        return self.cls.build_quantized(self.module, factors, hp, backend=backend,
                                        dropout=dropout)


def builder(cls: type, module: nn.Module):
    """``cls`` for a dense module; for a quantized one an object whose ``build(weight, bias,
    factors, hp, ...)`` wraps the module in ``quantized_class(cls)`` (weight is ignored)."""
    return _Builder(cls, module) if is_quantized(module) else cls


def _export_classes() -> dict:
    from svk.nn import METHODS
    return {method: quantized_class(cls) for method, cls in METHODS.items()}


QUANTIZED_METHODS = _export_classes()
QuantizedLoRAXSLinear = QUANTIZED_METHODS["lora_xs"]
QuantizedSARALinear = QUANTIZED_METHODS["sara"]
QuantizedMoSARALinear = QUANTIZED_METHODS["mosara"]
QuantizedKaSALinear = QUANTIZED_METHODS["kasa"]
QuantizedSiVALinear = QUANTIZED_METHODS["siva"]
QuantizedLoRALinear = QUANTIZED_METHODS["lora"]
QuantizedPiSSALinear = QUANTIZED_METHODS["pissa"]
