"""How an injected model's state_dict stores its svk layers, so that no load is silently wrong.

inject installs these hooks on every adapter layer (and one check on the model). In the
state_dict of an SVLinear at prefix P:

  P + "svk_merged"   a 0-d uint8 tensor, 1 when the layer is merged. A merged model's state
                     loaded into an unmerged layer (or the reverse) would apply the update twice
                     (or not at all): such a load is refused, by layer name.
  P + "weight"       in the original module's layout (Conv1D's (in, out) for a layer built from
                     a GPT-2 Conv1D). While merged it is the adapted model's effective weight,
                     so a plain transformers model loads it (from_pretrained of a merged
                     model gives the fine-tuned model). While unmerged it is the frozen base
                     (KaSA/PiSSA: the rewritten residual) and is stored with a leading unit
                     dimension, (1, out, in): a plain model refuses it with a size mismatch
                     naming the key, instead of silently loading a base without its adapter.

Loading into an injected model undoes both (exactly: views, no arithmetic). A state without
"svk_merged" is taken as a plain model's: its weights are the original base in the original
layout, accepted by unmerged layers that keep the base as it is and refused by KaSA/PiSSA
layers (whose base is rewritten) and by merged layers.
"""
from __future__ import annotations

import torch

MERGED_KEY = "svk_merged"


def state_dict_post_hook(module, state_dict, prefix, local_metadata) -> None:
    key = prefix + "weight"
    if key in state_dict:
        weight = state_dict[key]
        if module.from_conv1d:
            weight = weight.t()
        if not module.merged:
            weight = weight.unsqueeze(0)
        state_dict[key] = weight
    state_dict[prefix + MERGED_KEY] = torch.tensor(int(module.merged), dtype=torch.uint8)


def check_incoming(module, state_dict, prefix: str, name: str) -> None:
    """Raises ValueError when loading ``state_dict`` into the layer would be wrong."""
    key = prefix + "weight"
    marker = state_dict.get(prefix + MERGED_KEY)
    if marker is None:
        if key not in state_dict:
            return
        if module.merged:
            raise ValueError(f"layer {name!r} is merged but the state holds a plain (unmerged) "
                             f"weight {key!r}: svk.unmerge(model) before loading it")
        if module.base_removed_b is not None:
            raise ValueError(
                f"layer {name!r} ({module.method}) holds a rewritten base, but the state holds a "
                f"plain model's weight {key!r}: loading it would replace the residual base by the "
                "original one. Load the plain weights into the base model before svk.inject")
        return
    incoming = bool(int(marker))
    if incoming != module.merged:
        state = "merged" if incoming else "unmerged"
        fix = "svk.merge(model)" if incoming else "svk.unmerge(model)"
        raise ValueError(
            f"layer {name!r}: the state was saved from a {state} model but the layer is "
            f"{'merged' if module.merged else 'unmerged'}; loading it would apply the adapter's "
            f"update {'twice' if incoming else 'not at all'}. Call {fix} before loading")


def load_state_dict_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
                             unexpected_keys, error_msgs) -> None:
    check_incoming(module, state_dict, prefix, prefix.rstrip(".") or type(module).__name__)
    marker = state_dict.pop(prefix + MERGED_KEY, None)
    key = prefix + "weight"
    if key not in state_dict:
        return
    weight = state_dict[key]
    if marker is not None and not module.merged and weight.dim() == 3 and weight.shape[0] == 1:
        weight = weight[0]
    if module.from_conv1d and weight.dim() == 2:
        # contiguous: load_state_dict(assign=True) installs this tensor as the weight, and the
        # fused ops take (out, in) row-major weights
        weight = weight.t().contiguous()
    state_dict[key] = weight
    if module.merged:
        # The exact-unmerge copy belongs to the weight being replaced; without it unmerge()
        # subtracts the (loaded) update instead.
        module._original_weight = None


def model_load_pre_hook(model, state_dict, prefix, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs) -> None:
    """Checks every adapter layer before any tensor is copied: a refused load changes
    nothing (torch loads module by module, so a layer's own hook would come too late)."""
    from svk.nn.base import SVLinear
    for name, module in model.named_modules():
        if isinstance(module, SVLinear):
            check_incoming(module, state_dict, f"{prefix}{name}.", name)


def install(model, layers) -> list:
    """Hooks on each layer and the model-wide check; returns the handles. A layer whose
    ``_svk_state_hooks`` is already True (hooks registered by its constructor) gets none: the
    layout changes must be applied exactly once."""
    handles = [model.register_load_state_dict_pre_hook(model_load_pre_hook)]
    for layer in layers:
        if getattr(layer, "_svk_state_hooks", False):
            continue
        handles.append(layer.register_state_dict_post_hook(state_dict_post_hook))
        handles.append(layer.register_load_state_dict_pre_hook(load_state_dict_pre_hook))
        layer._svk_state_hooks = True
    return handles
