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

The serving model (what a decode step costs, threads, compiled and captured graphs):
- Ids live in one preallocated device buffer, `bank.ids_buffer` (max_batch int64 entries).
  `activate` validates the ids once per batch on the host and copies them, in place, into a
  slice of that buffer; every bank layer passes the same slice to the op. A decode step is then
  one sv_bank_linear call per adapted layer and nothing else: BankLinear.forward reads two
  attributes and calls the op. Because the storage never moves, a compiled model
  (torch.compile) or a captured CUDA graph keeps reading the ids the latest `activate` wrote:
  warm up (`bank.warmup(batch_sizes)`), capture once per batch size inside `activate`, then
  `with bank.activate(new_ids): graph.replay()`.
- One user for whole batches: `with bank.merged(name):` runs every bank layer as one GEMM with
  that adapter merged (out of place: one extra copy of the adapted weights while open).
- Threads: activation state is per thread, and `activate` blocks serialise: a thread's block
  waits until another thread's block has ended (one ids buffer, one batch at a time; pass
  `timeout=` to get a RuntimeError instead of waiting). A forward in a thread that has not
  entered `activate` raises, even while another thread serves; `remove` refuses an adapter the
  serving thread uses; `add` into a free slot may run while another thread serves. Coroutines
  of one event loop share a thread: do not await inside a block.
- Layout: ids are batch-major, one per sequence (x.shape[0] of a batch-first model) or one per
  token ((batch, seq_len)). See AdapterBank's batch_first.

Memory: capacity × layers × r² × dtype size for the cores (`nbytes`), plus one copy of a, s, b
per layer; add/remove never reallocate, so compiled graphs and captured CUDA graphs stay valid.
"""
from __future__ import annotations

import contextlib
import heapq
import math
import os
import sys
import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from svk.ops import _checks, _dispatch
from svk.ops.sv_bank_linear import _sv_bank_linear
from svk.ops.sv_bank_linear import run as _run_bank

__all__ = ["AdapterBank", "BankLinear"]

INJECTED = "__injected__"

# How per-sequence ids meet x's leading dimensions (set once per activation, read per layer).
_AS_GIVEN = 0       # batch-first (or per-token ids already laid out like x): the op's own check
_SEQ_FIRST = 1      # x is (seq, batch, ..., in): broadcast the ids along dim 1
_UNKNOWN = 2        # layout not told: refuse a 3-D+ x whose first two dimensions are equal


class _Serving(threading.local):
    """The serving state of one bank, per thread: what its layers read in forward.

    A thread that has not entered `bank.activate` sees ids None, whatever another thread
    serves. Class attributes are each thread's initial values."""
    ids = None          # the (validated) ids the op gets: a view of bank.ids_buffer
    layout = _AS_GIVEN
    merged = False      # inside bank.merged(name): the layers run their merged weights

    def __reduce__(self):
        # A copied or pickled model (copy.deepcopy, torch.save(model)) gets an inactive state
        # of its own: serving state belongs to a bank and a thread, never to a file.
        return _Serving, ()


class _Block:
    """One open activate/merged block: what the layers serve while it is the innermost."""

    def __init__(self, *, ids=None, layout=_AS_GIVEN, merged=False, host=None):
        self.ids = ids              # the view of ids_buffer the layers read (None: merged)
        self.layout = layout
        self.merged = merged
        self.host = host            # the block's ids (or merged slot) on the host
        self.weights = {}           # merged: layer name -> merged weight


class BankLinear(nn.Module):
    """A frozen linear layer plus the LoRA-XS cores of every user in a bank.

    weight (out, in), bias, a (r, in), s (r,), b (out, r) are shared and frozen; `cores`
    (capacity, r, r) is a non-persistent buffer (a bank's million cores do not belong in the
    model's state_dict; adapters live in their own files). The rows' adapter ids come from the
    owning bank's `activate` context, per thread.
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
        self._serving = _Serving()          # replaced by the bank's, shared by all its layers
        self._merged_weight = None          # set by bank.merged() for its thread

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def _ids(self):
        """The ids this thread serves (None outside `activate`); read-only, for tools."""
        return self._serving.ids

    def forward(self, x):
        # The decode path: two attribute reads and the op. The ids were validated on the host
        # by bank.activate, once for the batch: no per-layer check or device assertion.
        serving = self._serving
        ids = serving.ids
        if ids is None:
            return self._idle(x)
        if serving.layout:
            ids = _laid_out(self.name, x, ids, serving.layout)
        args = self.__dict__.get("_checked")
        if args is None or _dispatch.autocast_dtype(x) is not None:
            y = _sv_bank_linear(x, self.weight, self.a, self.s, self.b, self.cores, ids,
                                bias=self.bias, scaling=self.scaling, backend=self.backend,
                                device_check=False)
            # The layer's tensors passed every check: later calls check only x (.to() and
            # attribute assignment check everything again).
            self.__dict__["_checked"] = (self.weight, self.a, self.s, self.b, self.cores,
                                         self.bias, self.scaling, self.backend)
            return y
        weight, a, s, b, cores, bias, scaling, backend = args
        _checks.activation(x, weight)
        return _run_bank(x, weight, a, s, b, cores, ids, bias, scaling, backend, False)

    def __setattr__(self, name, value):
        self.__dict__.pop("_checked", None)
        super().__setattr__(name, value)

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_checked", None)
        return super()._apply(fn, *args, **kwargs)

    def _idle(self, x):
        if self._serving.merged:
            return F.linear(x, self._merged_weight, self.bias)
        raise RuntimeError(
            f"bank layer {self.name!r} ran outside `with bank.activate(adapter_ids):` in this "
            "thread (activation is per thread); pass one adapter id (slot or name) per "
            "sequence, -1 for the base model")

    def merged_weight(self, slot: int) -> torch.Tensor:
        """W + scaling·b·cores[slot]·diag(s)·a in the weight's dtype, computed as
        SVLinear.delta_weight and merge() compute it (so the result is bit for bit what
        svk.merge gives a layer holding that core)."""
        weight = self.weight.detach()
        dtype = torch.promote_types(weight.dtype, torch.float32)
        right = self.cores[slot].to(dtype) @ (self.a.to(dtype) * self.s.to(dtype)[:, None])
        delta = (self.b.to(dtype) * self.scaling) @ right
        return (weight.to(dtype) + delta).to(weight.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"capacity={self.cores.shape[0]}, scaling={self.scaling}")


def _laid_out(name, x, ids, layout):
    """Per-sequence ids against a model whose layout is not batch-first (or not told)."""
    if x.dim() < 3:
        return ids                          # rows are the sequences either way
    if layout == _SEQ_FIRST:
        if x.shape[1] != ids.shape[0]:
            raise ValueError(f"bank layer {name!r}: x has shape {tuple(x.shape)} (sequence-"
                             f"first: batch is dim 1) but {ids.shape[0]} ids were activated")
        return ids.view(1, -1, *([1] * (x.dim() - 3))).expand(x.shape[:-1])
    if x.shape[0] == x.shape[1] and x.shape[0] > 1:
        raise ValueError(
            f"bank layer {name!r}: x has shape {tuple(x.shape)}, whose first two dimensions "
            "are equal, and the bank was not told the model's layout: one id per sequence is "
            "ambiguous. Build the bank with batch_first=True (x is (batch, seq, ...), as in "
            "Hugging Face models) or batch_first=False (x is (seq, batch, ...))")
    if x.shape[0] != ids.shape[0] and x.shape[1] == ids.shape[0]:
        raise ValueError(
            f"bank layer {name!r}: x has shape {tuple(x.shape)} and {ids.shape[0]} ids were "
            "activated, one per sequence along dim 1: a sequence-first model? Build the bank "
            "with batch_first=False (ids apply along dim 0 unless told)")
    return ids


class AdapterBank:
    """Holds up to `capacity` LoRA-XS adapters of one base model and serves them mixed.

    model: an nn.Module (a Hugging Face model or plain PyTorch), converted in place: each
        layer targeted by cfg becomes a BankLinear. Everything is validated before anything is
        converted: a refused bank leaves the model as it was. A model not yet injected is
        injected with cfg first, which computes the same frozen factors the adapters were
        trained with (same config, same base). A model already injected with LoRA-XS
        (svk.inject) must agree with cfg (the same adapted layers, rank and alpha); its
        trained cores are kept as the adapter `injected_name`.
    cfg: an svk.AdapterConfig with method="lora_xs".
    capacity: number of adapter slots, preallocated.
    dtype: the cores' storage dtype (default: the base weights' dtype, e.g. bf16 on a bf16
        model: 512 bytes per layer and user at r = 16).
    max_batch: the most ids one activation holds (sequences, or tokens for per-token ids):
        the size of the preallocated ids buffer (int64, on the model's device).
    batch_first: the layout of the activations the adapted layers see, for one id per
        sequence. True: x is (batch, seq, ..., in), ids apply along dim 0 (every Hugging Face
        transformers model; the default for a transformers PreTrainedModel). False: x is
        (seq, batch, ..., in), ids apply along dim 1. None (the default for other models):
        not told; dim 0, and a forward whose x has equal first two dimensions (> 1) is refused
        as ambiguous rather than guessed.
    injected_name: the name under which an injected model's own trained cores are added to
        the bank (slot 0); None discards them (explicitly).
    """

    def __init__(self, model: nn.Module, cfg, capacity: int, *, dtype: torch.dtype | None = None,
                 max_batch: int = 4096, batch_first: bool | None = None,
                 injected_name: str | None = INJECTED, progress: bool | None = None):
        from svk.integrations import AdapterConfig, adapted_layers
        if not isinstance(cfg, AdapterConfig):
            raise TypeError(f"cfg must be an svk.AdapterConfig, got {type(cfg).__name__}")
        if cfg.method != "lora_xs":
            raise ValueError(f"an AdapterBank serves LoRA-XS adapters (method='lora_xs'), got "
                             f"method={cfg.method!r}: other methods have no shared frozen basis")
        for arg, value in (("capacity", capacity), ("max_batch", max_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if batch_first is not None and not isinstance(batch_first, bool):
            raise TypeError(f"batch_first must be True, False or None, got {batch_first!r}")
        if injected_name is not None and (not isinstance(injected_name, str) or not injected_name):
            raise TypeError(f"injected_name must be a non-empty str or None, got "
                            f"{injected_name!r}")
        if any(isinstance(m, BankLinear) for m in model.modules()):
            raise ValueError("the model already holds bank layers; one AdapterBank per model")
        if batch_first is None:
            transformers = sys.modules.get("transformers")
            if transformers is not None and isinstance(model, transformers.PreTrainedModel):
                batch_first = True
        self.batch_first = batch_first

        # Everything that can fail (validation, inject, allocations) comes before the first
        # bank layer enters the model.
        svk_layers = adapted_layers(model)
        if svk_layers:
            _check_injected(model, svk_layers, cfg)
            built = _bank_layers(svk_layers, cfg, capacity, dtype)     # the model is untouched
            ids_buffer = _ids_buffer(built, max_batch)
            kept = ({name: layer.core.detach() for name, layer in svk_layers.items()}
                    if injected_name is not None else None)
        else:
            # inject converts the model: undo it if anything below refuses.
            with _restored_on_error(model, cfg):
                _inject(model, cfg, progress)
                built = _bank_layers(adapted_layers(model), cfg, capacity, dtype)
                ids_buffer = _ids_buffer(built, max_batch)
            kept = None

        self.cfg = cfg
        self.capacity = capacity
        self.model = model
        self._serving = _Serving()
        modules = dict(model.named_modules())
        self.layers: "OrderedDict[str, BankLinear]" = OrderedDict()
        for name, bank_layer in built.items():
            bank_layer._serving = self._serving
            parent, _, child = name.rpartition(".")
            setattr(modules[parent] if parent else model, child, bank_layer)
            self.layers[name] = bank_layer
        self._slots: "OrderedDict[str, int]" = OrderedDict()
        self._free = list(range(capacity))          # a heap: the lowest free slot first
        self._occupied = torch.zeros(capacity, dtype=torch.bool)   # host mirror, for checks
        # _serve_lock: held by the thread inside activate/merged blocks (re-entrant: a thread
        # may nest them). _book_lock: the slot tables and which slots the serving thread uses.
        self._serve_lock = threading.RLock()
        self._book_lock = threading.Lock()
        self._blocks: list[_Block] = []     # the serving thread's open blocks, innermost last
        self.ids_buffer = ids_buffer
        self._views: dict = {}              # shape -> the same view of ids_buffer, every time
        self._sketches: dict = {}           # layer name -> the base weight's fingerprint sketch
        if kept is not None:
            self.add(injected_name, {f"{n}.core": core for n, core in kept.items()})

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
    def max_batch(self) -> int:
        return self.ids_buffer.shape[0]

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
        Everything is validated before anything is copied. Safe while another thread serves:
        a free slot is in no activated batch.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        cores = self._read(adapter)
        with self._book_lock:
            if name in self._slots:
                raise ValueError(f"an adapter named {name!r} is already in the bank (slot "
                                 f"{self._slots[name]}); remove it first")
            if not self._free:
                raise RuntimeError(f"the bank is full (capacity {self.capacity}); remove an "
                                   "adapter or build a bank with a larger capacity")
            slot = heapq.heappop(self._free)
            with torch.no_grad():
                for layer_name, layer in self.layers.items():
                    layer.cores[slot].copy_(cores[layer_name])
            self._slots[name] = slot
            self._occupied[slot] = True
        return slot

    def remove(self, name: str) -> int:
        """Frees an adapter's slot (its cores are zeroed) and returns the slot. Refused while
        an `activate` block (of any thread) serves it."""
        with self._book_lock:
            slot = self.slot(name)
            if any(bool((block.host == slot).any()) for block in self._blocks):
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
            self._check_base(adapter)
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

    def _check_base(self, file) -> None:
        """A format-2 file's base-weight fingerprint of every layer against the bank's
        weight: catches a base the singular values alone do not tell apart (the same spectrum,
        other singular vectors). The bank's sketches are computed once per layer (one pass
        over each weight), not once per added adapter."""
        from svk.integrations import adapter_io
        from svk.integrations._fingerprint import sketch
        if file.format_version == "1":
            return                          # format 1 records no fingerprint
        for layer_name, layer in self.layers.items():
            stored = file.tensors.get(f"{layer_name}.{adapter_io.FINGERPRINT_SUFFIX}")
            if layer_name not in file.layers or stored is None:
                continue                    # reported with the missing/unexpected cores
            ours = self._sketches.get(layer_name)
            if ours is None:
                ours = self._sketches[layer_name] = sketch(layer.weight)
            adapter_io._check_fingerprint(layer_name, file, stored, ours, layer.weight.dtype)

    # ---- serving ----------------------------------------------------------------------
    def ids(self, adapters) -> torch.Tensor:
        """Adapter ids (int64, on the model's device; a new tensor, not the ids buffer) for a
        list of names, slots or -1/None, or an integer tensor of slots; every id must be -1 or
        a slot holding an adapter."""
        host, source = self._host_ids(adapters)
        with self._book_lock:
            self._validate(host)
        return host.to(self._device())

    def _device(self) -> torch.device:
        return next(iter(self.layers.values())).weight.device

    def _host_ids(self, adapters):
        """(int64 host copy, the tensor to copy into the buffer) of one activation's ids."""
        if isinstance(adapters, torch.Tensor):
            if adapters.dtype.is_floating_point or adapters.dtype.is_complex or (
                    adapters.dtype == torch.bool):
                raise TypeError(f"adapter ids must be an integer tensor, got {adapters.dtype}")
            if adapters.dim() not in (1, 2):
                raise ValueError(f"adapter ids must have shape (batch,) (one per sequence) or "
                                 f"(batch, seq_len) (one per token), got {tuple(adapters.shape)}")
            source = adapters.detach()
            # One device-to-host copy per batch (a synchronisation on CUDA), not per layer.
            return source.to("cpu", torch.int64), source
        if isinstance(adapters, (str, int)):
            raise TypeError("activate takes one id per sequence (a list or a tensor), got "
                            f"a single {type(adapters).__name__}")
        values = []
        with self._book_lock:
            for item in adapters:
                if item is None:
                    values.append(-1)
                elif isinstance(item, str):
                    values.append(self.slot(item))
                elif isinstance(item, int) and not isinstance(item, bool):
                    values.append(item)
                else:
                    raise TypeError(f"adapter ids are names, slots or -1, got {item!r}")
        host = torch.tensor(values, dtype=torch.int64).reshape(len(values))
        return host, host

    def _validate(self, host):
        """Every id is -1 or an occupied slot (call under _book_lock)."""
        bad = host[(host < -1) | (host >= self.capacity)]
        if bad.numel():
            raise ValueError(f"adapter id {int(bad[0])} is outside [-1, {self.capacity - 1}] "
                             f"(the bank's capacity is {self.capacity})")
        empty = host[(host >= 0) & ~self._occupied[host.clamp(min=0)]]
        if empty.numel():
            raise ValueError(f"adapter slot {int(empty[0])} is empty (never added, or removed): "
                             "serving it would give the base model silently")

    def _view(self, shape):
        """The one view of ids_buffer for a shape (the same tensor every time)."""
        view = self._views.get(shape)
        if view is None:
            view = self._views[shape] = self.ids_buffer[:math.prod(shape)].view(shape)
        return view

    def _layout(self, host) -> tuple[int, bool]:
        """(layout code for the layers, transpose per-token ids into (seq, batch))."""
        if host.dim() == 2:                 # per token: laid out like x's leading dims here
            if self.batch_first is None and host.shape[0] == host.shape[1] > 1:
                raise ValueError(
                    f"per-token adapter ids of shape {tuple(host.shape)} are ambiguous: the "
                    "bank was not told the model's layout; build it with batch_first=True or "
                    "batch_first=False")
            return _AS_GIVEN, self.batch_first is False
        if self.batch_first is None:
            return _UNKNOWN, False
        return (_AS_GIVEN if self.batch_first else _SEQ_FIRST), False

    @contextlib.contextmanager
    def activate(self, adapter_ids, *, timeout: float | None = None):
        """Serves `adapter_ids` in every bank layer inside the block, in this thread.

        adapter_ids: one entry per sequence of the batch (names, slots, or -1/None for the base
        model), or an integer tensor of slots shaped (batch,) or (batch, seq_len) (one per token,
        for a single forward; generate() needs one per sequence). Validated here, once per
        batch, on the host (a CUDA tensor costs one device-to-host copy), then copied in place
        into bank.ids_buffer; the block yields that view of the buffer.

        Blocks of different threads are serialised: this waits while another thread is inside
        an activate (or merged) block, at most `timeout` seconds (None: no limit), then raises
        RuntimeError. The same thread may nest blocks; the outer ids come back on exit.
        Interleaving blocks within one thread (two coroutines of one event loop, each awaiting
        inside its block) is not supported: a forward serves the innermost open block's ids,
        whoever calls it. Serve concurrent requests from threads (or keep awaits out of the
        block); a block that ends out of order raises RuntimeError, after the bank is put back
        in a consistent state.

        A compiled model or a captured CUDA graph reads bank.ids_buffer: capture inside
        `activate(ids)` (after a warm-up call at that batch size: bank.warmup), then replay
        inside `activate(new_ids)` with new ids of the same shape.
        """
        self._enter_serving(timeout)
        try:
            block = self._open_ids_block(adapter_ids)
        except BaseException:
            self._serve_lock.release()
            raise
        try:
            yield block.ids
        finally:
            self._close(block)

    @contextlib.contextmanager
    def merged(self, name: str, *, timeout: float | None = None):
        """Serves one adapter to every row of every batch inside the block, in this thread,
        through merged weights: each bank layer runs F.linear(x, W', bias) with
        W' = W + scaling·b·core·diag(s)·a computed as svk.merge computes it (the update in
        fp32, or fp64 for a fp64 base, rounded once to the weight's dtype), so the outputs are
        those of a model injected with that adapter and merged. One GEMM per layer: the base
        layer's cost, for any batch size and layout.

        Costs one extra copy of every adapted weight while the block is open (freed at its
        end); the shared weights are never modified, so the bank path (and any graph captured
        from it) is unaffected. Threads and nesting as for `activate`. A graph compiled or
        captured inside `activate` runs the bank path, not this one: capture it here.
        """
        self._enter_serving(timeout)
        try:
            block = self._open_merged_block(name)
        except BaseException:
            self._serve_lock.release()
            raise
        try:
            yield
        finally:
            self._close(block)

    def _enter_serving(self, timeout):
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, (int, float)) or timeout < 0):
            raise ValueError(f"timeout must be a non-negative number of seconds or None, got "
                             f"{timeout!r}")
        if not self._serve_lock.acquire(timeout=-1 if timeout is None else timeout):
            raise RuntimeError(f"another thread has been serving this bank for more than "
                               f"{timeout} s (activate blocks of different threads run one at "
                               "a time: one ids buffer, one batch)")

    def _open_ids_block(self, adapter_ids) -> "_Block":
        """Validates ids, writes them into the buffer and makes them this thread's."""
        host, source = self._host_ids(adapter_ids)
        layout, transpose = self._layout(host)
        if host.numel() > self.max_batch:
            raise ValueError(f"{host.numel()} adapter ids do not fit the bank's ids buffer "
                             f"(max_batch={self.max_batch}); build the bank with a larger "
                             "max_batch")
        if self.ids_buffer.device != self._device():     # the model moved since
            self.ids_buffer = self.ids_buffer.to(self._device())
            self._views.clear()
        if transpose:
            host, source = host.t(), source.t()
        block = _Block(ids=self._view(tuple(host.shape)), layout=layout, host=host)
        with self._book_lock:
            self._validate(host)
            self._blocks.append(block)
        try:
            block.ids.copy_(source)
        except BaseException:
            with self._book_lock:
                self._blocks.remove(block)
            raise
        self._apply(block)
        return block

    def _open_merged_block(self, name) -> "_Block":
        with self._book_lock:
            block = _Block(merged=True, host=torch.tensor([self.slot(name)]))
            self._blocks.append(block)
        try:
            with torch.no_grad():
                block.weights = {n: layer.merged_weight(int(block.host[0]))
                                 for n, layer in self.layers.items()}
        except BaseException:
            with self._book_lock:
                self._blocks.remove(block)
            raise
        self._apply(block)
        return block

    def _apply(self, block, *, rewrite=False) -> None:
        """Makes `block` (None: no block) what this thread's layers serve; rewrite: copy its ids
        into the buffer again (an inner block wrote over them)."""
        serving = self._serving
        if block is None:
            serving.ids, serving.layout, serving.merged = None, _AS_GIVEN, False
            weights = {}
        else:
            serving.ids, serving.layout, serving.merged = block.ids, block.layout, block.merged
            weights = block.weights
            if rewrite and block.ids is not None:
                block.ids.copy_(block.host)
        if weights or self._has_merged:     # one setattr per layer only around merged()
            for name, layer in self.layers.items():
                layer._merged_weight = weights.get(name)
            self._has_merged = bool(weights)

    _has_merged = False     # whether the layers hold merged weights (one thread's, by the lock)

    def _close(self, block) -> None:
        """Ends a block: the enclosing block (or none) is served again, the block's ids stop
        counting as served, the lock is released; refuses an out-of-order end, after that."""
        try:
            with self._book_lock:
                innermost = self._blocks[-1] is block
                self._blocks.remove(block)
                top = self._blocks[-1] if self._blocks else None
            self._apply(top, rewrite=True)
        finally:
            self._serve_lock.release()
        if not innermost:
            raise RuntimeError(
                "bank blocks of one thread ended out of order (interleaved, e.g. two coroutines "
                "each awaiting inside `bank.activate`): while both were open, the outer one's "
                "forwards ran with the inner one's ids. Nest blocks, or serve concurrent "
                "requests from threads (activate blocks of different threads are serialised)")

    def warmup(self, batch_sizes=(1,), seq_lens=(1,), **kwargs):
        """svk.warmup of the bank's model at every batch size, each inside an activation of
        that many ids (the resident adapters in turn; -1 rows when the bank is empty), so every
        kernel a decode step launches has tuned before a CUDA graph is captured. kwargs go to
        svk.warmup (make_inputs, backward, save). Returns svk.warmup's tuned configs."""
        from svk.warmup import warmup
        slots = list(self._slots.values()) or [-1]
        configs = {}
        for batch in batch_sizes:
            if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
                raise ValueError(f"batch_sizes must hold positive ints, got {batch!r}")
            with self.activate([slots[i % len(slots)] for i in range(batch)]):
                configs = warmup(self.model, batch_sizes=[batch], seq_lens=seq_lens, **kwargs)
        return configs

    def __repr__(self) -> str:
        return (f"AdapterBank({len(self)}/{self.capacity} adapters, {len(self.layers)} layers, "
                f"rank {self.rank}, {self.nbytes / 2**20:.1f} MiB of cores)")


# ---- building ---------------------------------------------------------------------------
def _check_injected(model, svk_layers, cfg) -> None:
    """An injected model must be what cfg would inject: LoRA-XS, unmerged, the same layers,
    rank and alpha. Raises before anything changes."""
    from svk.nn.base import is_adaptable
    foreign = sorted({layer.method for layer in svk_layers.values()} - {"lora_xs"})
    if foreign:
        raise ValueError(f"the model holds {foreign} adapter layers; a bank needs LoRA-XS")
    hp = cfg.hparams()
    rank = hp["rank"]
    scaling = cfg.method_class.scaling_for(hp, rank)
    for name, layer in svk_layers.items():
        if layer.merged:
            raise ValueError(f"layer {name!r} is merged; unmerge before building a bank")
        if not cfg.matches(name):
            raise ValueError(f"the model's adapted layer {name!r} is not in cfg.target_modules="
                             f"{cfg.target_modules!r}; pass the config the model was injected "
                             "with")
        if layer.rank != rank:
            raise ValueError(f"layer {name!r} has rank {layer.rank} but cfg says rank {rank}; "
                             "pass the config the model was injected with")
        if not math.isclose(layer.scaling, scaling, rel_tol=1e-9):
            raise ValueError(f"layer {name!r} has scaling {layer.scaling} but cfg gives "
                             f"{scaling} (alpha {hp['alpha']} / rank {rank}); pass the config "
                             "the model was injected with")
    missing = [name for name, module in model.named_modules()
               if name and cfg.matches(name) and is_adaptable(module)]
    if missing:
        raise ValueError(f"cfg.target_modules={cfg.target_modules!r} matches layers the model "
                         f"was not injected with: {missing[:5]}; pass the config the model "
                         "was injected with")


def _bank_layers(svk_layers, cfg, capacity, dtype) -> "OrderedDict[str, BankLinear]":
    """A BankLinear per adapted layer, sharing its frozen tensors (the model is untouched)."""
    return OrderedDict(
        (name, BankLinear(layer.weight, layer.bias, layer.a, layer.s, layer.b, layer.scaling,
                          capacity, dtype=dtype, backend=cfg.backend, name=name))
        for name, layer in svk_layers.items())


def _ids_buffer(built, max_batch) -> torch.Tensor:
    device = next(iter(built.values())).weight.device
    return torch.full((max_batch,), -1, dtype=torch.int64, device=device)


def _inject(model, cfg, progress):
    from svk.integrations import inject
    inject(model, cfg, progress=progress)


@contextlib.contextmanager
def _restored_on_error(model, cfg):
    """Puts the targeted modules, every requires_grad flag and the config back when the body
    raises (inject converts and freezes the model)."""
    from svk.nn.base import is_adaptable
    originals = {name: module for name, module in model.named_modules()
                 if name and cfg.matches(name) and is_adaptable(module)}
    flags = [(param, param.requires_grad) for param in model.parameters()]
    had_config = "_svk_config" in vars(model)
    try:
        yield
    except BaseException:
        modules = dict(model.named_modules())
        for name, module in originals.items():
            parent, _, child = name.rpartition(".")
            owner = modules.get(parent) if parent else model
            if owner is not None:
                setattr(owner, child, module)
        for param, flag in flags:
            param.requires_grad_(flag)
        if not had_config:
            vars(model).pop("_svk_config", None)
        raise


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
