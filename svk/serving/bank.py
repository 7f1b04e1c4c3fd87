"""svk.serving.AdapterBank: many per-user LoRA-XS adapters on one base model (DESIGN.md §6).

LoRA-XS users of one base share a, s, b (the top-r SVD of each adapted weight); a user owns one
r×r core per adapted layer. The bank converts the targeted layers into BankLinear layers that
keep the shared factors once and the cores of `capacity` users in one preallocated
(capacity, r, r) buffer per layer, and serves any mix of users in one batch through
svk.ops.sv_bank_linear:

    bank = AdapterBank(model, AdapterConfig(method="lora_xs", rank=16,
                                            target_modules=["q_proj", "v_proj"]), capacity=10_000)
    alice = bank.add("alice", "alice.safetensors")     # -> slot; copies r×r blocks, nothing else
    with bank.activate(["alice", "bob", -1]):           # one id (slot or name) per sequence
        out = model.generate(input_ids, max_new_tokens=20)

Adapter files are those of svk.save_adapter from a model injected with the same config on the
same base (svk.integrations.adapter_io documents the format). The bank runs the same
svk.inject to compute the frozen factors, so they are the adapters' own; `add` checks the
method, rank, scaling, layer names and shapes, the singular values the file records as a
fingerprint of the base, and the frozen a/b when the file holds them.

Memory: capacity × layers × r² × dtype size for the cores (`nbytes`), plus one copy of a, s, b
per layer; add/remove never reallocate, so compiled graphs and captured CUDA graphs stay valid.
"""
from __future__ import annotations

import contextlib
import heapq
import math
import os
from collections import OrderedDict

import torch
from torch import nn

from svk.ops.sv_bank_linear import _sv_bank_linear

__all__ = ["AdapterBank", "BankLinear"]


class BankLinear(nn.Module):
    """A frozen linear layer plus the LoRA-XS cores of every user in a bank.

    weight (out, in), bias, a (r, in), s (r,), b (out, r) are shared and frozen; `cores`
    (capacity, r, r) is a non-persistent buffer (a bank's million cores do not belong in the
    model's state_dict; adapters live in their own files). The rows' adapter ids come from the
    owning bank's `activate` context.
    """

    def __init__(self, weight, bias, a, s, b, scaling, capacity, *, dtype=None, backend="auto",
                 name=""):
        super().__init__()
        self.weight, self.bias, self.a, self.s, self.b = weight, bias, a, s, b
        self.scaling = float(scaling)
        self.backend = backend
        self.name = name
        self.out_features, self.in_features = weight.shape
        r = a.shape[0]
        self.register_buffer("cores", torch.zeros(capacity, r, r, device=weight.device,
                                                  dtype=dtype or weight.dtype), persistent=False)
        self._ids = None

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def forward(self, x):
        if self._ids is None:
            raise RuntimeError(
                f"bank layer {self.name!r} ran outside `with bank.activate(adapter_ids):`; pass "
                "one adapter id (slot or name) per sequence, -1 for the base model")
        # The ids were validated on the host by bank.activate, once for the batch: no per-layer
        # device-side check (one launch per layer on the decode path).
        return _sv_bank_linear(x, self.weight, self.a, self.s, self.b, self.cores, self._ids,
                               bias=self.bias, scaling=self.scaling, backend=self.backend,
                               device_check=False)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"capacity={self.cores.shape[0]}, scaling={self.scaling}")


class AdapterBank:
    """Holds up to `capacity` LoRA-XS adapters of one base model and serves them mixed.

    model: an nn.Module (a Hugging Face model or plain PyTorch), converted in place: each
        layer targeted by cfg becomes a BankLinear. A model already injected with LoRA-XS
        (svk.inject) is converted as it is; otherwise the bank injects cfg first, which computes
        the same frozen factors the adapters were trained with (same config, same base).
    cfg: an svk.AdapterConfig with method="lora_xs".
    capacity: number of adapter slots, preallocated.
    dtype: the cores' storage dtype (default: the base weights' dtype, e.g. bf16 on a bf16
        model: 512 bytes per layer and user at r = 16).
    """

    def __init__(self, model: nn.Module, cfg, capacity: int, *, dtype: torch.dtype | None = None,
                 progress: bool | None = None):
        from svk.integrations import AdapterConfig, adapted_layers, inject
        if not isinstance(cfg, AdapterConfig):
            raise TypeError(f"cfg must be an svk.AdapterConfig, got {type(cfg).__name__}")
        if cfg.method != "lora_xs":
            raise ValueError(f"an AdapterBank serves LoRA-XS adapters (method='lora_xs'), got "
                             f"method={cfg.method!r}: other methods have no shared frozen basis")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        if any(isinstance(m, BankLinear) for m in model.modules()):
            raise ValueError("the model already holds bank layers; one AdapterBank per model")
        if not adapted_layers(model):
            inject(model, cfg, progress=progress)
        svk_layers = adapted_layers(model)
        foreign = sorted({layer.method for layer in svk_layers.values()} - {"lora_xs"})
        if foreign:
            raise ValueError(f"the model holds {foreign} adapter layers; a bank needs LoRA-XS")
        self.cfg = cfg
        self.capacity = capacity
        self.model = model
        self.layers: "OrderedDict[str, BankLinear]" = OrderedDict()
        modules = dict(model.named_modules())
        for name, layer in svk_layers.items():
            if layer.merged:
                raise ValueError(f"layer {name!r} is merged; unmerge before building a bank")
            bank_layer = BankLinear(layer.weight, layer.bias, layer.a, layer.s, layer.b,
                                    layer.scaling, capacity, dtype=dtype, backend=layer.backend,
                                    name=name)
            parent, _, child = name.rpartition(".")
            setattr(modules[parent] if parent else model, child, bank_layer)
            self.layers[name] = bank_layer
        self._slots: "OrderedDict[str, int]" = OrderedDict()
        self._free = list(range(capacity))          # a heap: the lowest free slot first
        self._occupied = torch.zeros(capacity, dtype=torch.bool)   # host mirror, for checks
        self._active = self._active_host = None

    # ---- adapters ---------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Names of the adapters in the bank, in the order they were added."""
        return list(self._slots)

    def slot(self, name: str) -> int:
        if name not in self._slots:
            raise KeyError(f"no adapter named {name!r} in the bank (it holds {self.names[:8]}"
                           f"{'…' if len(self._slots) > 8 else ''})")
        return self._slots[name]

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, name) -> bool:
        return name in self._slots

    @property
    def rank(self) -> int:
        return next(iter(self.layers.values())).rank

    @property
    def nbytes(self) -> int:
        """Bytes of the cores' storage: capacity × layers × r² × dtype size."""
        return sum(layer.cores.numel() * layer.cores.element_size()
                   for layer in self.layers.values())

    def add(self, name: str, adapter) -> int:
        """Copies an adapter's cores into a free slot and returns the slot.

        adapter: a path to a file written by svk.save_adapter, an AdapterFile
        (svk.integrations.read_adapter), or a state dict {"<layer name>.core": (r, r)} holding
        one core per bank layer (tensors under other names are ignored, except "<layer>.s",
        "<layer>.a", "<layer>.b", which are compared with the bank's frozen factors).
        Everything is validated before anything is copied.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        if name in self._slots:
            raise ValueError(f"an adapter named {name!r} is already in the bank (slot "
                             f"{self._slots[name]}); remove it first")
        if not self._free:
            raise RuntimeError(f"the bank is full (capacity {self.capacity}); remove an adapter "
                               "or build a bank with a larger capacity")
        cores = self._read(adapter)
        slot = heapq.heappop(self._free)
        with torch.no_grad():
            for layer_name, layer in self.layers.items():
                layer.cores[slot].copy_(cores[layer_name])
        self._slots[name] = slot
        self._occupied[slot] = True
        return slot

    def remove(self, name: str) -> int:
        """Frees an adapter's slot (its cores are zeroed) and returns the slot."""
        slot = self.slot(name)
        if self._active is not None and bool((self._active_host == slot).any()):
            raise RuntimeError(f"adapter {name!r} (slot {slot}) is being served by an active "
                               "`bank.activate(...)`; remove it after the block")
        with torch.no_grad():
            for layer in self.layers.values():
                layer.cores[slot].zero_()
        del self._slots[name]
        self._occupied[slot] = False
        heapq.heappush(self._free, slot)
        return slot

    def _read(self, adapter) -> dict:
        """Validated cores per bank layer, from a file, an AdapterFile or a state dict."""
        from svk.integrations.adapter_io import AdapterFile, read_adapter
        if isinstance(adapter, (str, os.PathLike)):
            adapter = read_adapter(adapter)
        if isinstance(adapter, AdapterFile):
            self._check_metadata(adapter)
            tensors = adapter.tensors
        elif isinstance(adapter, dict):
            tensors = adapter
        else:
            raise TypeError(f"adapter must be a path, an AdapterFile or a state dict, got "
                            f"{type(adapter).__name__}")
        cores_in = {key[:-len(".core")] for key in tensors if key.endswith(".core")}
        missing = [n for n in self.layers if n not in cores_in]
        unexpected = sorted(cores_in - set(self.layers))
        if missing or unexpected:
            raise ValueError(f"adapter layers differ from the bank's: missing cores for "
                             f"{missing[:5]}, cores for layers the bank does not hold "
                             f"{unexpected[:5]} (different target_modules or base model?)")
        cores = {}
        for layer_name, layer in self.layers.items():
            core = tensors[f"{layer_name}.core"]
            if not isinstance(core, torch.Tensor) or not core.is_floating_point():
                raise TypeError(f"{layer_name}.core must be a floating tensor")
            if tuple(core.shape) != (layer.rank, layer.rank):
                raise ValueError(f"{layer_name}.core has shape {tuple(core.shape)} but the bank's "
                                 f"rank is {layer.rank}: expected ({layer.rank}, {layer.rank})")
            for frozen in ("s", "a", "b"):
                value = tensors.get(f"{layer_name}.{frozen}")
                if value is not None:
                    _check_same_factor(f"{layer_name}.{frozen}", value, getattr(layer, frozen))
            cores[layer_name] = core.detach()
        return cores

    def _check_metadata(self, file) -> None:
        if file.method != "lora_xs":
            raise ValueError(f"the adapter file holds a {file.method!r} adapter; the bank serves "
                             "LoRA-XS adapters")
        for layer_name, meta in file.layers.items():
            layer = self.layers.get(layer_name)
            if layer is None:
                continue            # reported with the missing/unexpected cores
            if (meta["out_features"], meta["in_features"]) != (layer.out_features,
                                                               layer.in_features):
                raise ValueError(f"layer {layer_name!r}: base shape (out, in) "
                                 f"{(layer.out_features, layer.in_features)} in the bank but "
                                 f"{(meta['out_features'], meta['in_features'])} in the file")
            if meta["rank"] != layer.rank:
                raise ValueError(f"layer {layer_name!r}: rank {layer.rank} in the bank but "
                                 f"{meta['rank']} in the file")
            if not math.isclose(meta["scaling"], layer.scaling, rel_tol=1e-9):
                raise ValueError(f"layer {layer_name!r}: scaling {layer.scaling} in the bank but "
                                 f"{meta['scaling']} in the file (different alpha)")

    # ---- serving ----------------------------------------------------------------------
    def ids(self, adapters) -> torch.Tensor:
        """Adapter ids (int64, on the model's device) for a list of names, slots or -1/None,
        or an integer tensor of slots; every id must be -1 or a slot holding an adapter."""
        return self._resolve_ids(adapters)[0]

    def _resolve_ids(self, adapters):
        if isinstance(adapters, torch.Tensor):
            if adapters.dtype.is_floating_point or adapters.dtype in (torch.bool,
                                                                      torch.complex64,
                                                                      torch.complex128):
                raise TypeError(f"adapter ids must be an integer tensor, got {adapters.dtype}")
            host = adapters.detach().to("cpu", torch.int64)     # one copy per batch, not per layer
            device = next(iter(self.layers.values())).weight.device
            if adapters.device == device and adapters.dtype == torch.int64:
                self._validate(host)
                return adapters, host        # the caller's tensor itself: see activate()
        else:
            if isinstance(adapters, (str, int)):
                raise TypeError("activate takes one id per sequence (a list or a tensor), got "
                                f"a single {type(adapters).__name__}")
            values = []
            for item in adapters:
                if item is None:
                    values.append(-1)
                elif isinstance(item, str):
                    values.append(self.slot(item))
                elif isinstance(item, int) and not isinstance(item, bool):
                    values.append(item)
                else:
                    raise TypeError(f"adapter ids are names, slots or -1, got {item!r}")
            host = torch.tensor(values, dtype=torch.int64)
        self._validate(host)
        device = next(iter(self.layers.values())).weight.device
        return host.to(device, non_blocking=True), host

    def _validate(self, host):
        bad = host[(host < -1) | (host >= self.capacity)]
        if bad.numel():
            raise ValueError(f"adapter id {int(bad[0])} is outside [-1, {self.capacity - 1}] "
                             f"(the bank's capacity is {self.capacity})")
        empty = host[(host >= 0) & ~self._occupied[host.clamp(min=0)]]
        if empty.numel():
            raise ValueError(f"adapter slot {int(empty[0])} is empty (never added, or removed): "
                             "serving it would give the base model silently")

    @contextlib.contextmanager
    def activate(self, adapter_ids):
        """Serves `adapter_ids` in every bank layer inside the block.

        adapter_ids: one entry per sequence of the batch (names, slots, or -1/None for the base
        model), or an integer tensor of slots shaped (batch,) or (batch, seq_len) (one per token,
        for a single forward; generate() needs one per sequence). Validated here, once per
        batch, on the host: a CUDA tensor costs one device-to-host copy.

        An int64 tensor already on the model's device is served as it is (not copied), so a
        captured CUDA graph can keep reading one static ids tensor: update it in place
        (`static_ids.copy_(new_ids)`) and re-enter `activate(static_ids)` to validate it.
        """
        ids, host = self._resolve_ids(adapter_ids)
        previous = (self._active, getattr(self, "_active_host", None))
        self._active, self._active_host = ids, host
        for layer in self.layers.values():
            layer._ids = ids
        try:
            yield ids
        finally:
            self._active, self._active_host = previous
            for layer in self.layers.values():
                layer._ids = previous[0]

    def __repr__(self) -> str:
        return (f"AdapterBank({len(self)}/{self.capacity} adapters, {len(self.layers)} layers, "
                f"rank {self.rank}, {self.nbytes / 2**20:.1f} MiB of cores)")


def _check_same_factor(key, value, bank_value) -> None:
    """The adapter's frozen tensor (a fingerprint of the base SVD) must be the bank's."""
    ours = bank_value.detach().double().cpu()
    theirs = value.detach().double().cpu()
    if tuple(theirs.shape) != tuple(ours.shape):
        raise ValueError(f"{key}: shape {tuple(theirs.shape)} in the adapter but "
                         f"{tuple(ours.shape)} in the bank")
    scale = float(ours.abs().max().clamp(min=1))
    if not torch.allclose(theirs, ours, rtol=1e-4, atol=1e-5 * scale):
        raise ValueError(f"{key} differs between the adapter and the bank: the adapter was "
                         "trained on a different base model or SVD")
