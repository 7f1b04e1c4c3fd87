"""svk.nn.SVLinear: a frozen linear layer plus a singular-value adapter, as one module.

    y = x·Wᵀ + bias + scaling·(((x·aᵀ) ⊙ s)·coreᵀ·bᵀ) ⊙ out_scale        (DESIGN.md §2, §4)

Every method class (svk.nn.LoRAXSLinear, SARALinear, …) subclasses SVLinear and differs only
in which tensors it holds, which of them train, and how they are initialised from W. The
forward is exactly one call of a fused op (``svk.ops.sv_linear``, or ``sv_mixture_linear`` for
Mo-SARA) with the layer's ``backend`` passed through.

Storage. ``weight`` (out, in) and ``bias`` (out,) are the frozen base in nn.Linear layout (also
for a GPT-2 Conv1D, whose (in, out) weight is transposed once). Adapter tensors live under the
op's argument names. All of them are nn.Parameters; frozen ones have requires_grad=False. That
choice (rather than buffers) is deliberate: DDP only all-reduces parameters that require grad
and, unlike buffers, does not re-broadcast frozen parameters on every forward; ``.to()``,
``.half()`` and ``state_dict`` treat both alike; and save_adapter can select tensors by name.

Adapter tensors on a fp16/bf16 base are kept in fp32 (the ops accept mixed dtypes and
accumulate in fp32), as PEFT does by default; ``model.to(dtype)`` afterwards is the user's call.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from svk.ops import _checks, _dispatch
from svk.ops.sv_linear import run as _run_sv_linear
from svk.ops.sv_linear import sv_linear

ADAPTER_TENSORS = ("a", "s", "b", "core", "lambdas", "gate_in", "gate_out", "out_scale")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's transformers.pytorch_utils.Conv1D, recognised without importing transformers."""
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")
            and isinstance(getattr(module, "weight", None), Tensor)
            and tuple(module.weight.shape) == (module.nx, module.nf))


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The (out, in) weight and the bias of an nn.Linear or Conv1D (a transposed view for
    Conv1D)."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if is_conv1d(module):
        return module.weight.t(), module.bias
    raise TypeError(f"expected an nn.Linear or a transformers Conv1D, got {type(module).__name__}")


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


def kaiming_uniform(shape, fan_in, *, generator, device, dtype) -> Tensor:
    """nn.init.kaiming_uniform_(a=√5): U(−1/√fan_in, 1/√fan_in), the nn.Linear default."""
    bound = 1.0 / math.sqrt(fan_in)
    return uniform(shape, bound, generator=generator, device=device, dtype=dtype)


def uniform(shape, bound, *, generator, device, dtype) -> Tensor:
    draw_device = generator.device if generator is not None else device
    t = torch.empty(shape, device=draw_device, dtype=torch.float32)
    return t.uniform_(-bound, bound, generator=generator).to(device=device, dtype=dtype)


def normal(shape, std, *, generator, device, dtype) -> Tensor:
    draw_device = generator.device if generator is not None else device
    t = torch.randn(shape, generator=generator, device=draw_device, dtype=torch.float32)
    return (t * std).to(device=device, dtype=dtype)


class SVLinear(nn.Module):
    """A frozen base layer plus adapter tensors named after the op's arguments.

    Usable directly with any factors: ``SVLinear(weight, bias, a=a, s=s, b=b, core=core,
    trainable=("core",), scaling=2.0)``. Method subclasses add ``from_linear`` and their
    initialisation; see svk.nn for the table.

    Attributes: weight, bias, the adapter tensors (None where unused), scaling, backend
    ("auto" | "triton" | "torch", passed to the op), merged, method, hparams (the resolved
    hyperparameters), rank.
    """

    method = "sv"
    HPARAMS: dict = {}          # hyperparameter name -> paper default
    TRAINABLE: tuple = ()       # adapter tensors that train

    def __init__(self, weight: Tensor, bias: Tensor | None = None, *, scaling: float = 1.0,
                 trainable=None, backend: str = "auto", hparams: dict | None = None,
                 base_removed: tuple[Tensor, Tensor] | None = None, dropout: float = 0.0,
                 **tensors: Tensor | None):
        super().__init__()
        unknown = set(tensors) - set(ADAPTER_TENSORS)
        if unknown:
            raise TypeError(f"unknown adapter tensors {sorted(unknown)}; expected names from "
                            f"{ADAPTER_TENSORS}")
        if tensors.get("a") is None or tensors.get("b") is None:
            raise ValueError("an SVLinear needs at least a (r, in) and b (out, r)")
        if weight.dim() != 2:
            raise ValueError(f"weight must be (out, in), got shape {tuple(weight.shape)}")
        trainable = tuple(self.TRAINABLE if trainable is None else trainable)
        missing = [name for name in trainable if tensors.get(name) is None]
        if missing:
            raise ValueError(f"trainable tensors {missing} were not given")
        self.out_features, self.in_features = weight.shape
        self.weight = _frozen(weight)
        self.bias = None if bias is None else _frozen(bias)
        for name in ADAPTER_TENSORS:
            value = tensors.get(name)
            if value is None:
                self.register_parameter(name, None)
            else:
                # clone: factors arrive as slices of a batched SVD stack, which must not be
                # kept alive (nor shared between layers, which safetensors refuses to save).
                self.register_parameter(name, nn.Parameter(
                    value.detach().clone(memory_format=torch.contiguous_format),
                    requires_grad=name in trainable))
        self.scaling = float(scaling)
        self.backend = backend
        # Adapter dropout (PEFT's lora_dropout): applied to the adapter path's input while
        # training; the base GEMM always sees x.
        self.dropout = _checks.dropout(dropout)
        self.hparams = dict(hparams or {})
        self.merged = False
        # True when built from a GPT-2 Conv1D ((in, out) weight): export and unload use it.
        self.from_conv1d = False
        # While True (svk.disable_adapter) forward gives the original base layer's output.
        self.adapter_disabled = False
        self.register_buffer("_original_weight", None, persistent=False)
        # KaSA and PiSSA rewrite the base at initialisation: weight = W_original − b_r·a_r.
        # The removed low-rank part is kept (fp32, r·(in + out) numbers) so that the original
        # base can be recovered (original_weight) for export, unload and disable_adapter.
        removed_b, removed_a = base_removed if base_removed is not None else (None, None)
        for name, value in (("base_removed_b", removed_b), ("base_removed_a", removed_a)):
            self.register_buffer(name, None if value is None else
                                 value.detach().clone(memory_format=torch.contiguous_format))
        # Swappable for benchmarks (svk.reference has the same signatures); never set on a hot
        # path by svk itself.
        self.op = sv_linear

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def resolve_hparams(cls, **hparams) -> dict:
        """Fills defaults and validates; raises TypeError for names the method doesn't take."""
        unknown = set(hparams) - set(cls.HPARAMS)
        if unknown:
            raise TypeError(f"{cls.__name__} ({cls.method!r}) takes hyperparameters "
                            f"{sorted(cls.HPARAMS)}, got unexpected {sorted(unknown)}")
        resolved = dict(cls.HPARAMS)
        resolved.update({k: v for k, v in hparams.items() if v is not None})
        cls._validate(resolved)
        return resolved

    @classmethod
    def _validate(cls, hp: dict) -> None:
        from svk.integrations.config import validate_hparams
        validate_hparams(cls.method, hp)

    @classmethod
    def init_factors(cls, W: Tensor, hp: dict, *, generator=None) -> list[dict]:
        """Initial adapter tensors for each matrix of a stack W (n, out, in), computed with one
        batched svk.linalg call per spectral quantity. Returns per matrix a dict of adapter
        tensors, plus "weight" where the method rewrites the base (KaSA, PiSSA)."""
        raise NotImplementedError

    @classmethod
    def scaling_for(cls, hp: dict, rank: int) -> float:
        return 1.0

    @classmethod
    def from_linear(cls, linear: nn.Module, *, backend: str = "auto",
                    generator: torch.Generator | None = None, dropout: float = 0.0,
                    **hparams) -> "SVLinear":
        """Wraps an nn.Linear or a GPT-2 Conv1D. The base weight is shared with ``linear``
        for nn.Linear (and frozen) unless the method rewrites it; Conv1D weights are copied
        once into (out, in) layout. Hyperparameters by name, defaults from the papers. A
        quantized base (bitsandbytes, torchao) gives the method's quantized variant."""
        from svk.nn.quantized import is_quantized, quantized_class  # quantized imports base
        if is_quantized(linear) and quantized_class(cls) is not cls:
            return quantized_class(cls).from_linear(linear, backend=backend, generator=generator,
                                                    dropout=dropout, **hparams)
        hp = cls.resolve_hparams(**hparams)
        weight, bias = linear_weight(linear)
        factors = cls.init_factors(weight.detach()[None], hp, generator=generator)[0]
        return cls.build(weight, bias, factors, hp, backend=backend,
                         from_conv1d=is_conv1d(linear), dropout=dropout)

    @classmethod
    def build(cls, weight: Tensor, bias: Tensor | None, factors: dict, hp: dict, *,
              backend: str = "auto", from_conv1d: bool = False,
              dropout: float = 0.0) -> "SVLinear":
        factors = dict(factors)
        new_weight = factors.pop("weight", None)
        removed = factors.pop("base_removed", None)
        if new_weight is not None:
            weight = new_weight.clone(memory_format=torch.contiguous_format)
        elif not weight.is_contiguous():
            weight = weight.contiguous()
        rank = factors["a"].shape[0]
        layer = cls(weight, bias, scaling=cls.scaling_for(hp, rank), backend=backend,
                    hparams=hp, base_removed=removed, dropout=dropout, **factors)
        layer.from_conv1d = from_conv1d
        return layer

    # ---- forward ------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        args = self._validated
        if self.adapter_disabled:
            return F.linear(x, self.base_weight_without_adapter(), self.bias)
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        if args is None or _dispatch.autocast_dtype(x) is not None:
            return self._checked_forward(x)
        # The layer's own tensors were validated once (_checked_forward); per call only x.
        _checks.activation(x, args[0])
        if self.training and self.dropout:
            return _run_sv_linear(x, *args, self.dropout)
        return _run_sv_linear(x, *args)

    def _checked_forward(self, x: Tensor) -> Tensor:
        """The op with every argument check. When it passes, the op's arguments are kept as a
        tuple (module attribute lookups cost host time) and later calls check only x."""
        extra = {"dropout": self.dropout} if self.training and self.dropout else {}
        y = self.op(x, self.weight, self.a, self.s, self.b, bias=self.bias, core=self.core,
                    out_scale=self.out_scale, scaling=self.scaling, backend=self.backend,
                    **extra)
        if self.op is sv_linear:
            self._validated = (self.weight, self.a, self.s, self.b, self.bias, self.core,
                               self.out_scale, float(self.scaling), self.backend)
        return y

    # What cannot change between calls (the tensors' shapes, dtypes and devices, scaling,
    # backend) is checked once per layer. Assigning any attribute, .to()/.half()/.cuda(), or
    # loading a state dict makes the next call check everything again.
    _validated = None

    def __setattr__(self, name, value):
        if name != "_validated":
            self.__dict__["_validated"] = None
        super().__setattr__(name, value)

    def _apply(self, fn, *args, **kwargs):
        self._validated = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._validated = None
        return super()._load_from_state_dict(*args, **kwargs)

    # ---- introspection ------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, name) for name in ADAPTER_TENSORS
                if getattr(self, name) is not None}

    def trainable_names(self) -> list[str]:
        return [name for name, p in self.adapter_tensors().items() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.adapter_tensors().values() if p.requires_grad)

    def extra_repr(self) -> str:
        dropout = f", dropout={self.dropout:g}" if self.dropout else ""
        return (f"method={self.method!r}, in_features={self.in_features}, "
                f"out_features={self.out_features}, rank={self.rank}, "
                f"trainable={self.num_trainable()} ({'+'.join(self.trainable_names())}), "
                f"scaling={self.scaling:g}, merged={self.merged}{dropout}")

    def regularization_loss(self) -> Tensor:
        """The method's auxiliary loss for this layer (zero unless the method has one)."""
        return self.weight.new_zeros((), dtype=torch.float32)

    def original_weight(self) -> Tensor:
        """The base weight before the method rewrote it, (out, in), in the compute dtype
        (fp32, fp64 for a fp64 base): weight + base_removed_b·base_removed_a for KaSA and
        PiSSA (exact up to one rounding of the weight's dtype), weight itself otherwise.
        Unmerged weight only: raises while merged."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is merged; unmerge before asking for "
                               "the original weight")
        dtype = self._compute_dtype()
        weight = self.weight.detach().to(dtype)
        if self.base_removed_b is None:
            return weight
        return torch.addmm(weight, self.base_removed_b.to(dtype), self.base_removed_a.to(dtype))

    def base_weight_without_adapter(self) -> Tensor:
        """The original base weight in the weight's dtype, merged or not: what forward uses
        while the adapter is disabled. Costs one (out, in) product for KaSA/PiSSA or a merged
        layer; the plain weight otherwise."""
        if self.merged:
            if self._original_weight is not None and self.base_removed_b is None:
                return self._original_weight
            dtype = self._compute_dtype()
            weight = self.weight.detach().to(dtype) - self.delta_weight()
            if self.base_removed_b is not None:
                weight = torch.addmm(weight, self.base_removed_b.to(dtype),
                                     self.base_removed_a.to(dtype))
            return weight.to(self.weight.dtype)
        if self.base_removed_b is None:
            return self.weight
        return self.original_weight().to(self.weight.dtype)

    # ---- merging ------------------------------------------------------------------------
    def _compute_dtype(self) -> torch.dtype:
        return torch.promote_types(self.weight.dtype, torch.float32)

    def delta_weight(self) -> Tensor:
        """The (out, in) update merge() adds to weight, scaling included, in fp32 (fp64 for a
        fp64 base): scaling·(b ⊙ out_scale)·core·diag(s)·a."""
        dtype = self._compute_dtype()
        right = self.a.to(dtype) * self.s.to(dtype)[:, None]
        if self.core is not None:
            right = self.core.to(dtype) @ right
        left = self.b.to(dtype) * self.scaling
        if self.out_scale is not None:
            left = left * self.out_scale.to(dtype)[:, None]
        return left @ right

    @torch.no_grad()
    def merge(self, exact: bool = True) -> float:
        """Folds the update into weight; forward then costs one GEMM. Returns the relative
        error of the update the weight now holds, ‖round(W + ΔW) − W − ΔW‖ / ‖ΔW‖ (also kept
        as ``merge_error``): rounding to a 16-bit weight drops every entry of ΔW below half
        an ulp of W, which for a young adapter can be most of it (0 in fp32 up to rounding).

        exact=True keeps a copy of the unmerged weight (one extra weight of memory) so that
        unmerge() restores it bit for bit; exact=False keeps nothing and unmerge() subtracts
        the same fp32 delta again (exact up to one rounding of the weight dtype)."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is already merged")
        delta = self.delta_weight()
        self._original_weight = self.weight.detach().clone() if exact else None
        before = self.weight.to(delta.dtype, copy=True)
        self.weight.copy_((before + delta).to(self.weight.dtype))
        applied = self.weight.to(delta.dtype) - before
        scale = float(torch.linalg.norm(delta))
        self.merge_error = float(torch.linalg.norm(applied - delta)) / scale if scale else 0.0
        self.merged = True
        return self.merge_error

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged")
        if self._original_weight is not None:
            self.weight.copy_(self._original_weight)
            self._original_weight = None
        else:
            delta = self.delta_weight()
            self.weight.copy_((self.weight.to(delta.dtype) - delta).to(self.weight.dtype))
        self.merged = False


def _frozen(t: Tensor) -> nn.Parameter:
    if isinstance(t, nn.Parameter):
        t.requires_grad_(False)
        return t
    return nn.Parameter(t.detach(), requires_grad=False)
