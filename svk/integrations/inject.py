"""Model surgery: swap targeted linear layers for svk adapter layers, in place.

    summary = inject(model, AdapterConfig(method="lora_xs", rank=16,
                                          target_modules=["q_proj", "v_proj"]))
    merge(model); unmerge(model); regularization_loss(model); trainable_parameters(model)

inject initialises every targeted layer together: weights are grouped by (shape, dtype,
device) and each group's spectral quantities come from one batched svk.linalg call on the
weights' own device (DESIGN.md §4–5), in chunks that bound the stacked copy's memory.
"""
from __future__ import annotations

import logging
import warnings
from collections import OrderedDict, namedtuple
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from svk.integrations import _state_dict
from svk.integrations.config import AdapterConfig
from svk.nn.base import SVLinear, is_adaptable, is_conv1d
from svk.nn.quantized import base_weight, builder, weight_spec

logger = logging.getLogger("svk")

# A stacked group is at most this many bytes (fp32) at once; larger groups go in chunks.
_CHUNK_BYTES = 1 << 30


@dataclass
class LayerSummary:
    name: str
    method: str
    in_features: int
    out_features: int
    rank: int
    trainable: int


@dataclass
class InjectionSummary:
    """What inject did: one LayerSummary per adapted layer, in model order."""

    method: str
    layers: list
    trainable: int
    total: int

    @property
    def ranks(self) -> dict:
        return {layer.name: layer.rank for layer in self.layers}

    def table(self) -> str:
        width = max(len("layer"), *(len(layer.name) for layer in self.layers))
        lines = [f"{'layer':<{width}}  {'shape (out×in)':>15}  {'rank':>5}  {'trainable':>10}"]
        for layer in self.layers:
            shape = f"{layer.out_features}×{layer.in_features}"
            lines.append(f"{layer.name:<{width}}  {shape:>15}  {layer.rank:>5}  "
                         f"{layer.trainable:>10}")
        percent = 100.0 * self.trainable / max(self.total, 1)
        lines.append(f"{self.method}: {len(self.layers)} layers, {self.trainable} trainable of "
                     f"{self.total} parameters ({percent:.4f}%)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


ParameterCount = namedtuple("ParameterCount", ["trainable", "total"])


def adapted_layers(model: nn.Module) -> "OrderedDict[str, SVLinear]":
    """Qualified name -> SVLinear for every adapter layer of the model (DDP unwrapped)."""
    model = _unwrap(model)
    return OrderedDict((name, m) for name, m in model.named_modules() if isinstance(m, SVLinear))


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


@dataclass
class _Target:
    name: str               # the first name in named_modules() order
    module: nn.Module
    names: list             # every name the module is registered under (aliases included)


def _all_names(model: nn.Module) -> dict:
    """id(module) -> every qualified name it is registered under, in model order."""
    names: dict = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _output_layers(model: nn.Module) -> set:
    """ids of the modules "all-linear" leaves out, with everything inside them: the output
    embedding of a transformers model, or else its "score" / "classifier" head (PEFT 0.21's
    rule, _maybe_include_all_linear_layers; PEFT drops a classifier only with
    task_type=SEQ_CLS and only the head module itself, svk always and its whole subtree)."""
    head = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
    if head is None:
        for attr in ("score", "classifier"):
            if isinstance(getattr(model, attr, None), nn.Module):
                head = getattr(model, attr)
                break
    return set() if head is None else {id(m) for m in head.modules()}


def _resolve(model: nn.Module, cfg: AdapterConfig):
    """(targets, saved): the layers to adapt and the modules_to_save, both in model order.
    Raises ValueError for entries that match nothing and for overlaps."""
    names = _all_names(model)
    adaptable = [(name, m) for name, m in model.named_modules() if name and is_adaptable(m)]

    saved: list[_Target] = []
    if cfg.modules_to_save:
        all_names = [n for ns in names.values() for n in ns if n]
        missing = [e for e in cfg.modules_to_save
                   if not any(n == e or n.endswith("." + e) for n in all_names)]
        if missing:
            raise ValueError(f"modules_to_save entries {missing} match no module of the model")
        inside: set = set()
        for name, module in model.named_modules():
            if name and id(module) not in inside and any(
                    cfg.is_saved_module(n) for n in names[id(module)]):
                saved.append(_Target(name, module, names[id(module)]))
                inside |= {id(m) for m in module.modules()}
    saved_ids = {id(m) for t in saved for m in t.module.modules()}

    excluded = _output_layers(model) | saved_ids if cfg.all_linear else set()
    targets = [_Target(name, m, names[id(m)]) for name, m in adaptable
               if id(m) not in excluded and any(cfg.matches(n) for n in names[id(m)])]
    if not targets:
        shown = ", ".join(n for n, _ in adaptable[:12]) + (", …" if len(adaptable) > 12 else "")
        raise ValueError(f"no nn.Linear or Conv1D module matched target_modules="
                         f"{cfg.target_modules!r}; adaptable modules are: {shown or 'none'}")
    unmatched = cfg.unmatched_targets(n for _, m in adaptable for n in names[id(m)])
    if unmatched:
        others = [e for e in unmatched
                  if any(n == e or n.endswith("." + e) for ns in names.values() for n in ns)]
        detail = (f" ({others} name modules that are not nn.Linear or Conv1D)" if others
                  else "")
        raise ValueError(f"target_modules entries {unmatched} match no nn.Linear or Conv1D "
                         f"module{detail}; fix or remove them (the other entries matched "
                         f"{len(targets)} layers)")
    overlap = [t.name for t in targets if id(t.module) in saved_ids]
    if overlap:
        raise ValueError(f"{overlap} are both targeted and in modules_to_save; a module is "
                         "either adapted or trained in full")
    aliased = [t.names for t in targets if len(t.names) > 1]
    if aliased:
        warnings.warn(f"modules registered under several names: {aliased}. Each is adapted "
                      "once, and the one adapter layer replaces it under every name (shared, as "
                      "the module was)", stacklevel=3)
    return targets, saved


def _check_ties(model: nn.Module, targets) -> None:
    """Refuses a target whose weight is also used elsewhere (tied embeddings): merge() writes
    into the weight in place, which would change the other user too."""
    owners: dict = {}
    storages: dict = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False):
            qualified = f"{mname}.{pname}" if mname else pname
            owners.setdefault(id(param), []).append((qualified, module))
            # Distinct Parameters over the same memory tie too; compare where each tensor
            # starts (not its storage: tensors loaded from one file may share a storage).
            # (A wrapper tensor subclass such as torchao's quantized weights has no storage of
            # its own: data_ptr() is 0 for all of them.)
            if param.device.type != "meta" and param.numel() and param.data_ptr():
                storages.setdefault((param.device, param.data_ptr()), []).append(
                    (qualified, module))
    problems = []
    for target in targets:
        weight = target.module.weight
        sharing = owners[id(weight)]
        if weight.device.type != "meta" and weight.numel() and weight.data_ptr():
            sharing = sharing + storages[(weight.device, weight.data_ptr())]
        others = sorted({q for q, module in sharing if module is not target.module})
        if others:
            problems.append(f"{target.name}.weight is tied to {others}")
    if problems:
        first = problems[0].split(".weight", 1)[0]
        raise ValueError(
            "cannot adapt a tied weight: " + "; ".join(problems) + ". merge() writes into the "
            "weight, which would change the tied module too. Leave the layer out of "
            f"target_modules (\"all-linear\" already does for the output layer), or untie it "
            f"first: model.get_submodule({first!r}).weight = torch.nn.Parameter("
            f"model.get_submodule({first!r}).weight.detach().clone()), and for a "
            "transformers model also model.config.tie_word_embeddings = False so that "
            "save_pretrained and from_pretrained keep them apart")


# Largest rank a layer of shape (out, in) takes: min(out, in) − headroom. LoRA has no limit (its
# factors are random, not W's singular vectors); the adaptive methods pick k ≤ min(out, in).
_RANK_HEADROOM = {"lora_xs": 0, "pissa": 0, "kasa": 1}


def _check_ranks(targets, cfg: AdapterConfig, hp: dict) -> None:
    headroom = _RANK_HEADROOM.get(cfg.method)
    if headroom is None or "rank" not in hp:
        return
    bad = []
    for target in targets:
        out_features, in_features = weight_spec(target.module)[0]
        limit = min(out_features, in_features) - headroom
        if hp["rank"] > limit:
            bad.append(f"{target.name} ({out_features}×{in_features}, rank ≤ {limit})")
    if bad:
        why = " (KaSA keeps at least one component in the base)" if cfg.method == "kasa" else ""
        raise ValueError(f"{cfg.method}: rank={hp['rank']} is too large for {len(bad)} "
                         f"layer(s): {', '.join(bad)}{why}. Lower the rank or leave those layers "
                         "out of target_modules (a small classifier head is usually trained "
                         "in full: modules_to_save)")


def _groups(targets):
    """Targets grouped by (shape, dtype, device) in model order, each split into chunks whose
    fp32 stack stays under _CHUNK_BYTES."""
    groups: OrderedDict = OrderedDict()
    for target in targets:
        # (shape, dtype, device) of the dense or dequantized weight (quantized: svk.nn.quantized)
        groups.setdefault(weight_spec(target.module), []).append(target)
    for (shape, _, _), members in groups.items():
        per_chunk = max(1, _CHUNK_BYTES // (4 * shape[0] * shape[1]))
        for start in range(0, len(members), per_chunk):
            yield members[start:start + per_chunk]


def _build(targets, cfg: AdapterConfig, hp: dict, progress) -> dict:
    from tqdm.auto import tqdm

    cls = cfg.method_class
    generators: dict = {}
    built: dict[str, SVLinear] = {}
    bar = tqdm(total=len(targets), desc=f"svk inject {cfg.method}", unit="layer",
               disable=(None if progress is None else not progress))
    try:
        with torch.no_grad():
            for chunk in _groups(targets):
                weights = [base_weight(t.module) for t in chunk]
                device = weights[0][0].device
                generator = None
                # A meta model holds no values: nothing to seed (the SVD-based methods refuse
                # it in svk.linalg; LoRA's random factors are meta tensors too).
                if cfg.seed is not None and device.type != "meta":
                    if device not in generators:
                        generators[device] = torch.Generator(device=device).manual_seed(cfg.seed)
                    generator = generators[device]
                stack = torch.stack([w.detach() for w, _ in weights])
                factors = cls.init_factors(stack, hp, generator=generator)
                del stack
                for target, (weight, bias), layer_factors in zip(chunk, weights, factors):
                    built[target.name] = builder(cls, target.module).build(
                        weight, bias, layer_factors, hp, backend=cfg.backend,
                        dropout=cfg.dropout, from_conv1d=is_conv1d(target.module))
                    bar.update(1)
    finally:
        bar.close()
    return built


def _warn_untrainable(built: dict, method: str) -> None:
    """LoRA-XS's update is b·core·diag(s)·a and PiSSA's factors are √S-scaled: where W has zero
    singular values among the top r (an all-zero or low-rank weight), that part of the adapter
    has zero gradient forever."""
    if method not in ("lora_xs", "pissa"):
        return
    dead = []
    for name, layer in built.items():
        values = layer.s if method == "lora_xs" else layer.a.abs().amax(dim=1)
        zeros = int((values == 0).sum())
        if zeros:
            dead.append(f"{name} ({zeros} of {layer.rank})")
    if dead:
        warnings.warn(f"{method}: these layers' weights have zero singular values among the top "
                      f"r, so those adapter directions cannot train (an all-zero weight: none "
                      f"of it): {', '.join(dead)}", stacklevel=3)


def inject(model: nn.Module, cfg: AdapterConfig, *,
           progress: bool | None = None) -> InjectionSummary:
    """Replaces every nn.Linear / Conv1D whose name matches ``cfg.target_modules`` by the
    method's SVLinear, in place; freezes every other parameter of the model except those of
    ``cfg.modules_to_save``.

    Returns an InjectionSummary (``summary.table()`` prints each layer's rank and trainable
    count; also logged at INFO on the "svk" logger; nothing is printed). The adaptive methods
    (SARA, Mo-SARA, SiVA) choose ranks per layer. progress: tqdm bar over layers (None: only
    when stderr is a terminal).

    Everything is checked before the model changes; a refused inject leaves it as it was.
    Raises ValueError when nothing matched, a target_modules or modules_to_save entry matches
    nothing, a target's weight is tied to another module's, the rank is too large for a
    targeted layer (naming it), or the model already holds svk layers.
    """
    if not isinstance(cfg, AdapterConfig):
        raise TypeError(f"cfg must be an svk.AdapterConfig, got {type(cfg).__name__}")
    model = _unwrap(model)
    if adapted_layers(model):
        raise ValueError("the model already holds svk adapter layers; inject once per model")
    targets, saved = _resolve(model, cfg)
    _check_ties(model, targets)
    hp = cfg.hparams()
    _check_ranks(targets, cfg, hp)

    # Building shares (and freezes) nn.Linear weights; anything failing past this point puts
    # every requires_grad flag back, so that a refused inject changes nothing.
    flags = [(name, param, param.requires_grad) for name, param in model.named_parameters()]
    try:
        built = _build(targets, cfg, hp, progress)
    except BaseException:
        for _, param, flag in flags:
            param.requires_grad_(flag)
        raise

    for _, param, _ in flags:
        param.requires_grad_(False)
    modules = dict(model.named_modules(remove_duplicate=False))
    for target in targets:          # model order, whatever the grouping; every alias
        for name in target.names:
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, built[target.name])
    for target in saved:
        target.module.requires_grad_(True)
    model._svk_config = cfg
    model._svk_saved_modules = [t.name for t in saved]
    # unload() gives the base model's parameters their flags from before inject back.
    model._svk_requires_grad = {name: flag for name, _, flag in flags}
    model._svk_hooks = _state_dict.install(model, built.values())
    _warn_untrainable(built, cfg.method)

    count = trainable_parameters(model)
    summary = InjectionSummary(
        method=cfg.method,
        layers=[LayerSummary(name, cfg.method, layer.in_features, layer.out_features,
                             layer.rank, layer.num_trainable())
                for name, layer in ((t.name, built[t.name]) for t in targets)],
        trainable=count.trainable, total=count.total)
    model._svk_summary = summary
    logger.info("svk.inject:\n%s", summary.table())
    return summary


def _require_layers(model: nn.Module) -> "OrderedDict[str, SVLinear]":
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("the model holds no svk adapter layers; call svk.inject first")
    return layers


# svk.merge warns when a layer's merged weight holds its update less accurately than this.
MERGE_WARN_ERROR = 0.01


def merge(model: nn.Module, *, exact: bool = True, warn_above: float = MERGE_WARN_ERROR) -> dict:
    """Merges every unmerged adapter layer (see SVLinear.merge). Raises, merging nothing,
    when a layer cannot be merged (Mo-SARA).

    Returns {layer name: relative error of the update the merged weight holds}. In fp16/bf16
    rounding W + ΔW drops every entry of ΔW below half an ulp of W; a UserWarning names the
    layers whose error exceeds warn_above (1 %) — keep such a model unmerged (the fused op
    adds the update in fp32) or merge into fp32 weights."""
    layers = _require_layers(model)
    for name, layer in layers.items():
        if type(layer).merge is not SVLinear.merge:
            raise RuntimeError(f"layer {name!r} ({layer.method}) cannot be merged; nothing was "
                               "merged")
    errors = {name: layer.merge(exact=exact) for name, layer in layers.items()
              if not layer.merged}
    lossy = {name: error for name, error in errors.items() if error > warn_above}
    if lossy:
        worst = max(lossy, key=lossy.get)
        dtype = layers[worst].weight.dtype
        warnings.warn(f"svk.merge: {len(lossy)} layer(s) hold their update with more than "
                      f"{warn_above:.0%} error after rounding to {dtype} (worst {worst!r}: "
                      f"{lossy[worst]:.1%} of ΔW lost); keep the adapter unmerged, or merge "
                      "into fp32 weights", UserWarning, stacklevel=2)
    return errors


def unmerge(model: nn.Module) -> None:
    """Unmerges every merged adapter layer."""
    for layer in _require_layers(model).values():
        if layer.merged:
            layer.unmerge()


def regularization_loss(model: nn.Module, reduction: str = "mean") -> Tensor:
    """Sum of the adapted layers' auxiliary losses (KaSA's regulariser; zero for the other
    methods). Add it to the task loss.

    reduction="sum" equals PEFT's ``_get_kasa_loss`` exactly. reduction="mean" divides by the
    number L of adapted layers, as the KaSA reference code (juyongjiang/KaSA, ``loss_fn``)
    does, but each layer's term is the paper's r×r form (as PEFT's), not the reference code's
    in×in / out×out Gram form, whose value differs (MiniLM-L6 q/v, r 8: 7.4× at
    initialisation). For the reference code's value, average
    ``layer.regularization_loss(form="reference")`` over the KaSA layers."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    layers = list(_require_layers(model).values())
    total = sum((layer.regularization_loss() for layer in layers[1:]),
                layers[0].regularization_loss())
    return total / len(layers) if reduction == "mean" else total


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """(trainable, total) parameter counts; shared (tied) parameters count once. A
    bitsandbytes 4-bit weight counts its weights, not its storage bytes (two 4-bit codes per
    byte of its quant_storage), as PEFT counts them."""
    seen: dict[int, nn.Parameter] = {}
    for param in _unwrap(model).parameters():
        seen.setdefault(id(param), param)
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return ParameterCount(trainable, sum(_count(p) for p in seen.values()))


def _count(param) -> int:
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def print_trainable_parameters(model: nn.Module, *, per_layer: bool = False) -> ParameterCount:
    """Prints PEFT's line, "trainable params: … || all params: … || trainable%: …"; with
    per_layer=True first the table of every adapter layer (name, shape, rank, trainable).
    Returns the counts. (inject itself prints nothing: its summary is returned, and logged at
    INFO on the "svk" logger — logging.getLogger("svk").setLevel("INFO") with a handler.)"""
    count = trainable_parameters(model)
    if per_layer:
        layers = _require_layers(model)
        cfg = getattr(_unwrap(model), "_svk_config", None)
        method = cfg.method if cfg is not None else "/".join(
            sorted({layer.method for layer in layers.values()}))
        print(InjectionSummary(
            method=method,
            layers=[LayerSummary(name, layer.method, layer.in_features, layer.out_features,
                                 layer.rank, layer.num_trainable())
                    for name, layer in layers.items()],
            trainable=count.trainable, total=count.total).table())
    percent = 100.0 * count.trainable / max(count.total, 1)
    print(f"trainable params: {count.trainable:,d} || all params: {count.total:,d} || "
          f"trainable%: {percent:.4f}")
    return count
