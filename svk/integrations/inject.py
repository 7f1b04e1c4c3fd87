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
from collections import OrderedDict, namedtuple
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from svk.integrations.config import AdapterConfig
from svk.nn.base import SVLinear, is_adaptable, is_conv1d, linear_weight

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
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        return model.module
    return model


def _targets(model: nn.Module, cfg: AdapterConfig) -> list[tuple[str, nn.Module]]:
    targets = [(name, m) for name, m in model.named_modules()
               if name and cfg.matches(name) and is_adaptable(m)]
    if not targets:
        candidates = [name for name, m in model.named_modules() if is_adaptable(m)]
        shown = ", ".join(candidates[:12]) + (", …" if len(candidates) > 12 else "")
        raise ValueError(f"no nn.Linear or Conv1D module matched target_modules="
                         f"{cfg.target_modules!r}; adaptable modules are: {shown or 'none'}")
    return targets


def _groups(targets):
    """Targets grouped by (shape, dtype, device) in model order, each split into chunks whose
    fp32 stack stays under _CHUNK_BYTES."""
    groups: OrderedDict = OrderedDict()
    for name, module in targets:
        weight, _ = linear_weight(module)
        groups.setdefault((tuple(weight.shape), weight.dtype, weight.device), []).append(
            (name, module))
    for (shape, _, _), members in groups.items():
        per_chunk = max(1, _CHUNK_BYTES // (4 * shape[0] * shape[1]))
        for start in range(0, len(members), per_chunk):
            yield members[start:start + per_chunk]


def inject(model: nn.Module, cfg: AdapterConfig, *,
           progress: bool | None = None) -> InjectionSummary:
    """Replaces every nn.Linear / Conv1D whose name matches ``cfg.target_modules`` by the
    method's SVLinear, in place; freezes every other parameter of the model.

    Returns (and logs at INFO on the "svk" logger) an InjectionSummary with each layer's rank
    and trainable count; the adaptive methods (SARA, Mo-SARA, SiVA) choose ranks per layer.
    progress: tqdm bar over layers (None: only when stderr is a terminal).
    Raises ValueError when nothing matched or the model already holds svk layers.
    """
    from tqdm.auto import tqdm

    if not isinstance(cfg, AdapterConfig):
        raise TypeError(f"cfg must be an svk.AdapterConfig, got {type(cfg).__name__}")
    if adapted_layers(model):
        raise ValueError("the model already holds svk adapter layers; inject once per model")
    targets = _targets(model, cfg)
    cls, hp = cfg.method_class, cfg.hparams()
    for param in model.parameters():
        param.requires_grad_(False)

    generators: dict = {}
    modules = dict(model.named_modules())
    built: dict[str, SVLinear] = {}
    bar = tqdm(total=len(targets), desc=f"svk inject {cfg.method}", unit="layer",
               disable=(None if progress is None else not progress))
    with torch.no_grad():
        for chunk in _groups(targets):
            weights = [linear_weight(module) for _, module in chunk]
            device = weights[0][0].device
            generator = None
            if cfg.seed is not None:
                if device not in generators:
                    generators[device] = torch.Generator(device=device).manual_seed(cfg.seed)
                generator = generators[device]
            stack = torch.stack([w.detach() for w, _ in weights])
            factors = cls.init_factors(stack, hp, generator=generator)
            del stack
            for (name, _), (weight, bias), layer_factors in zip(chunk, weights, factors):
                built[name] = cls.build(weight, bias, layer_factors, hp, backend=cfg.backend,
                                        from_conv1d=is_conv1d(modules[name]))
                bar.update(1)
    bar.close()

    for name, _ in targets:          # model order, whatever the grouping
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, built[name])
    model._svk_config = cfg

    count = trainable_parameters(model)
    summary = InjectionSummary(
        method=cfg.method,
        layers=[LayerSummary(name, cfg.method, layer.in_features, layer.out_features,
                             layer.rank, layer.num_trainable())
                for name, layer in ((n, built[n]) for n, _ in targets)],
        trainable=count.trainable, total=count.total)
    logger.info("svk.inject:\n%s", summary.table())
    return summary


def _require_layers(model: nn.Module) -> "OrderedDict[str, SVLinear]":
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("the model holds no svk adapter layers; call svk.inject first")
    return layers


def merge(model: nn.Module, *, exact: bool = True) -> None:
    """Merges every unmerged adapter layer (see SVLinear.merge). Raises, merging nothing,
    when a layer cannot be merged (Mo-SARA)."""
    layers = _require_layers(model)
    for name, layer in layers.items():
        if type(layer).merge is not SVLinear.merge:
            raise RuntimeError(f"layer {name!r} ({layer.method}) cannot be merged; nothing was "
                               "merged")
    for layer in layers.values():
        if not layer.merged:
            layer.merge(exact=exact)


def unmerge(model: nn.Module) -> None:
    """Unmerges every merged adapter layer."""
    for layer in _require_layers(model).values():
        if layer.merged:
            layer.unmerge()


def regularization_loss(model: nn.Module, reduction: str = "mean") -> Tensor:
    """Sum of the adapted layers' auxiliary losses (KaSA's regulariser; zero for the other
    methods), averaged over the L adapted layers (reduction="mean", as the KaSA reference code
    does) or summed ("sum", as PEFT's ``_get_kasa_loss`` does). Add it to the task loss."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    layers = list(_require_layers(model).values())
    total = sum((layer.regularization_loss() for layer in layers[1:]),
                layers[0].regularization_loss())
    return total / len(layers) if reduction == "mean" else total


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """(trainable, total) parameter counts; shared (tied) parameters count once."""
    seen: dict[int, nn.Parameter] = {}
    for param in _unwrap(model).parameters():
        seen.setdefault(id(param), param)
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return ParameterCount(trainable, sum(p.numel() for p in seen.values()))
