"""Back to a plain model, and the base model on demand.

    plain = svk.unload(model, merge=True)    # nn.Linear / Conv1D holding the merged weights
    plain = svk.unload(model, merge=False)   # the original layers (KaSA/PiSSA: un-rewritten)
    with svk.disable_adapter(model):         # the original base model's outputs
        reference_logits = model(ids).logits
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from svk.integrations.inject import _require_layers, _unwrap
from svk.nn.quantized import QuantizedSVLinear


def _names_of(model: nn.Module) -> dict:
    names: dict = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _plain_layer(layer, merge: bool) -> nn.Module:
    """An nn.Linear (or Conv1D, for a layer built from one) holding the layer's merged weight
    (merge=True) or its original base weight (merge=False), in the weight's dtype. Consumes
    the layer: its weight may be merged/unmerged in place and reused. A layer on a quantized
    base gives its base_layer back, untouched (merge=True is refused by unload first)."""
    if isinstance(layer, QuantizedSVLinear):
        return layer.base_layer.train(layer.training)
    with torch.no_grad():
        if merge:
            if not layer.merged:
                layer.merge(exact=False)    # in place: no second copy of the weight
            weight = layer.weight
        else:
            if layer.merged:
                layer.unmerge()
            # KaSA/PiSSA: residual + the removed part, one rounding to the weight dtype;
            # otherwise the base weight itself (shared, not copied).
            weight = (layer.weight if layer.base_removed_b is None
                      else layer.original_weight().to(layer.weight.dtype))
        bias = layer.bias
        with torch.device("meta"):
            if layer.from_conv1d:
                from transformers.pytorch_utils import Conv1D
                plain = Conv1D(layer.out_features, layer.in_features)
            else:
                plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None)
        if layer.from_conv1d:
            weight = weight.t().contiguous()
        plain.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        if bias is not None:
            plain.bias = bias
    return plain.train(layer.training)


def unload(model: nn.Module, *, merge: bool = True) -> nn.Module:
    """Replaces every svk adapter layer by a plain nn.Linear (a transformers Conv1D for a layer
    injected into one) and returns the model, ready for transformers' save_pretrained and
    from_pretrained.

    merge=True: the layers hold the merged weights (the adapted model; KaSA/PiSSA: residual +
    update), exact up to one rounding of the weight dtype. merge=False: the original layers
    back, for KaSA and PiSSA with the original, un-rewritten weight (exact up to one rounding
    of the weight dtype; the other methods give the base weight itself). Every parameter gets
    its requires_grad from before inject back. Raises (changing nothing) for merge=True on a
    model holding Mo-SARA layers, whose update has no single weight, or layers on a quantized
    base (svk.nn.quantized), which merge=False gives back untouched.
    """
    model = _unwrap(model)
    layers = _require_layers(model)
    if merge:
        for name, layer in layers.items():
            if layer.method == "mosara":
                raise ValueError(f"layer {name!r} is Mo-SARA, whose update depends on each token "
                                 "and cannot be merged into a weight; unload(merge=False) gives "
                                 "the base model back")
            if isinstance(layer, QuantizedSVLinear):
                raise ValueError(f"layer {name!r} has a quantized base "
                                 f"({type(layer.base_layer).__name__}): merging would requantize "
                                 "it (new codes, a second rounding error); unload(merge=False) "
                                 "gives the quantized base model back and svk.export_peft writes "
                                 "the adapter as a PEFT LoRA on it")
    names = _names_of(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    for layer in layers.values():
        plain = _plain_layer(layer, merge)
        for name in names[id(layer)]:       # every name the layer is registered under
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, plain)
    for handle in getattr(model, "_svk_hooks", None) or ():
        handle.remove()
    flags = getattr(model, "_svk_requires_grad", None) or {}
    for name, param in model.named_parameters():
        param.requires_grad_(flags.get(name, False))
    for attr in ("_svk_config", "_svk_saved_modules", "_svk_requires_grad", "_svk_hooks",
                 "_svk_summary"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Within the block every svk layer computes the original base layer (KaSA and PiSSA
    included: their rewritten base plus the removed part), merged or not; the adapters are
    back after it, also when the block raises. For evaluation against the base and for DPO's
    reference model. Gradients still flow to the inputs; the adapter tensors get none."""
    layers = list(_require_layers(model).values())
    previous = [layer.adapter_disabled for layer in layers]
    for layer in layers:
        layer.adapter_disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, previous):
            layer.adapter_disabled = flag
