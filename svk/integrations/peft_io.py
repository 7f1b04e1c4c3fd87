"""PEFT interop: export svk adapters as PEFT LoRA checkpoints, import PEFT LoRA/KaSA ones.

    svk.export_peft(model, "out/")       # adapter_config.json + adapter_model.safetensors
    peft.PeftModel.from_pretrained(original_base, "out/")      # the same logits; vLLM too
    svk.import_peft(plain_base, "peft_checkpoint/")           # svk layers from PEFT's files

Export. Every svk method but Mo-SARA adds a fixed low-rank update to the ORIGINAL base
weight W, so it is exactly a LoRA: ΔW = B·A with no SVD truncation (PEFT's own converter from
other adapters to LoRA truncates; this one is exact):

    LoRA-XS          A = core·diag(s)·a (r, in),  B = scaling·b (out, r)         rank r
    SARA, LoRA, SiVA A = diag(s)·a,               B = scaling·b (⊙ out_scale)    rank r or k
    KaSA, PiSSA      the above stacked with the removed part of the base:
                     A = [A; a_removed], B = [B, −b_removed]                     rank 2r
                     (their base is W − b_removed·a_removed, so the update relative to W is
                     delta_weight() − b_removed·a_removed)

The scale is folded into B, so every module's PEFT scaling is exactly 1: the global
``lora_alpha`` equals the global ``r`` (the largest rank), and modules of another rank get
``rank_pattern[m] = alpha_pattern[m] = k`` (SARA and SiVA choose ranks per layer). vLLM, which
ignores rank_pattern/alpha_pattern and applies one scale lora_alpha/r to every module (ranks
come from the tensor shapes), therefore computes the same update. Merged layers export the
same factors (merging changes the base weight, never the adapter tensors).

Import. ``import_peft`` swaps each module named in the checkpoint for an svk.nn.LoRALinear
(a = lora_A, b = lora_B, s = 1, scaling = alpha/r, or alpha/√r with use_rslora), or a
KaSALinear for a PEFT KaSA checkpoint (the base truncated exactly as PEFT does it), and
training continues on svk's fused path. PEFT features svk does not have raise a ValueError
naming them instead of loading something else.
"""
from __future__ import annotations

import json
import math
import os
import re

import torch
from torch import Tensor, nn

from svk.integrations.config import AdapterConfig
from svk.integrations.inject import (InjectionSummary, LayerSummary, adapted_layers,
                                     trainable_parameters, _unwrap)
from svk.nn.base import SVLinear, adapter_dtype, is_adaptable, is_conv1d
from svk.nn.quantized import base_weight, is_quantized, quantized_class

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."          # PEFT's key prefix (PeftModel.base_model.model)

# init_lora_weights values that only initialise A and B; the others (pissa, olora, corda,
# loftq, lora_ga) also rewrite the base weights when PEFT loads the checkpoint.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


# ---- export ------------------------------------------------------------------------------

def lora_factors(layer: SVLinear) -> tuple[Tensor, Tensor]:
    """(A (k, in), B (out, k)) with B·A = the layer's update relative to its ORIGINAL base
    weight (for KaSA and PiSSA: delta_weight() − base_removed_b·base_removed_a), computed in
    fp64 and returned in fp32 (fp64 for a fp64 base). Merged or not gives the same factors.
    Raises ValueError for Mo-SARA, whose update depends on the token."""
    from svk.nn import MoSARALinear

    if isinstance(layer, MoSARALinear):
        raise ValueError("Mo-SARA's update depends on each token through its router gate, so "
                         "it is not a fixed low-rank update and has no LoRA equivalent")
    f64 = torch.float64
    right = layer.a.detach().to(f64) * layer.s.detach().to(f64)[:, None]
    if layer.core is not None:
        right = layer.core.detach().to(f64) @ right
    left = layer.b.detach().to(f64) * layer.scaling
    if layer.out_scale is not None:
        left = left * layer.out_scale.detach().to(f64)[:, None]
    if layer.base_removed_b is not None:
        right = torch.cat([right, layer.base_removed_a.to(f64)], dim=0)
        left = torch.cat([left, -layer.base_removed_b.to(f64)], dim=1)
    dtype = torch.promote_types(layer.weight.dtype, torch.float32)
    return right.to(dtype).contiguous(), left.to(dtype).contiguous()


def _pattern_matches(pattern: str, name: str) -> bool:
    """PEFT's rank_pattern/alpha_pattern rule (peft.utils.other.get_pattern_key)."""
    return re.match(rf"(.*\.)?({pattern})$", name) is not None


def _pattern_key(name: str, all_names: list[str]) -> str:
    """The module's full name as a rank_pattern key, escaped only where the plain name (whose
    dots match any character) would also select another module."""
    if [n for n in all_names if _pattern_matches(name, n)] == [name]:
        return name
    return re.escape(name)


def _target_modules(model: nn.Module, adapted: list[str]) -> list[str]:
    """PEFT's target_modules list: the short names (["q_proj", "v_proj"], what PEFT users and
    servers expect) when they select exactly the adapted modules among all the model's modules
    (PEFT's list rule: equal, or ending in "." + name), the full names otherwise."""
    short = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    selected = [name for name, _ in model.named_modules()
                if name and (name in short or any(name.endswith("." + t) for t in short))]
    return short if sorted(selected) == sorted(adapted) else sorted(adapted)


def export_peft(model: nn.Module, directory: str | os.PathLike, *,
                base_model_name_or_path: str | None = None,
                task_type: str | None = None) -> dict:
    """Writes the model's svk adapters as a PEFT LoRA checkpoint (adapter_config.json and
    adapter_model.safetensors, PEFT 0.21's key naming ``base_model.model.<module>.lora_A.weight``)
    that ``peft.PeftModel.from_pretrained(original_base, directory)`` and vLLM load to the same
    outputs (see the module docstring). ``model`` is the model whose module names PEFT will
    see (the one you would pass to PeftModel); the original base is the model before
    svk.inject (for KaSA and PiSSA: before their base rewrite). base_model_name_or_path
    (default: the model's ``name_or_path`` when it has one) and task_type (e.g. "CAUSAL_LM",
    for peft.AutoPeftModelForCausalLM) go into the config as PEFT writes them.

    Returns the config written. Raises ValueError for Mo-SARA layers and for
    ``modules_to_save``; every check runs before anything is written."""
    from safetensors.torch import save_file

    layers = adapted_layers(model)
    if not layers:
        raise ValueError("the model holds no svk adapter layers; nothing to export")
    root = _unwrap(model)
    cfg = getattr(root, "_svk_config", None)
    if cfg is not None and getattr(cfg, "modules_to_save", None):
        raise ValueError(f"export_peft does not write modules_to_save {cfg.modules_to_save} "
                         "(fully trained modules); vLLM refuses them too. Save those modules' "
                         "weights with the base model instead")
    mosara = [name for name, layer in layers.items() if layer.method == "mosara"]
    if mosara:
        raise ValueError(f"layers {mosara[:3]} are Mo-SARA, whose update depends on each token "
                         "through its router gate: it has no LoRA (PEFT/vLLM) equivalent")

    tensors, ranks = {}, {}
    for name, layer in layers.items():
        try:
            a, b = lora_factors(layer)
        except ValueError as error:
            raise ValueError(f"layer {name!r}: {error}") from None
        ranks[name] = a.shape[0]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.cpu()

    r = max(ranks.values())
    all_names = [n for n, _ in root.named_modules() if n]
    rank_pattern = {_pattern_key(name, all_names): k for name, k in ranks.items() if k != r}
    conv1d = [layer.from_conv1d for layer in layers.values()]
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(root, "name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        # alpha = r (and alpha_pattern = rank_pattern) makes PEFT's scaling alpha/r exactly 1
        # for every module; B already carries the scale.
        "lora_alpha": r,
        "target_modules": _target_modules(root, list(layers)),
        "exclude_modules": None,
        "lora_dropout": float(getattr(cfg, "dropout", 0.0) or 0.0),
        # PEFT keeps lora_A (k, in) and lora_B (out, k) for Conv1D too; fan_in_fan_out only
        # tells it that the base weight is (in, out) when merging. PEFT resets it per module
        # (with a warning) should a model mix Conv1D and nn.Linear targets.
        "fan_in_fan_out": any(conv1d),
        "bias": "none",
        "use_rslora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "use_dora": False,
        "lora_bias": False,
    }
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
    return config


# ---- import ------------------------------------------------------------------------------

def _unsupported(config: dict) -> list[str]:
    """PEFT features that change what a checkpoint computes and that svk does not have."""
    found = []
    if config.get("use_dora"):
        found.append("DoRA (use_dora=True)")
    if config.get("lora_bias"):
        found.append("lora_bias=True")
    if config.get("bias", "none") != "none":
        found.append(f"bias={config['bias']!r} (trained base-layer biases)")
    if config.get("modules_to_save"):
        found.append(f"modules_to_save={config['modules_to_save']}")
    if config.get("target_parameters"):
        found.append(f"target_parameters={config['target_parameters']} (nn.Parameter targets)")
    for key, what in (("trainable_token_indices", "trainable tokens"),
                      ("layer_replication", "layer replication"),
                      ("alora_invocation_tokens", "activated LoRA"),
                      ("use_qalora", "QA-LoRA"), ("use_bdlora", "BD-LoRA"),
                      ("arrow_config", "Arrow routing"), ("monteclora_config", "MonteCLoRA"),
                      ("velora_config", "VeLoRA"), ("megatron_config", "Megatron layers")):
        if config.get(key):
            found.append(f"{what} ({key})")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        found.append(f"init_lora_weights={init!r} (PEFT rewrites the base weights on load; "
                     "convert the checkpoint to a plain LoRA with PEFT's "
                     "path_initial_model_for_weight_conversion)")
    return found


def _read_weights(directory: str) -> dict:
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.exists(path):
        from safetensors.torch import load_file
        return load_file(path)
    path = os.path.join(directory, BIN_WEIGHTS_NAME)
    if os.path.exists(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory!r} holds neither {WEIGHTS_NAME} nor {BIN_WEIGHTS_NAME}")


def _per_module(weights: dict, kasa: bool, directory: str) -> dict:
    """module name -> {"lora_A": …, "lora_B": …[, "lora_diag": …]}; raises on any other key."""
    suffixes = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B"}
    if kasa:
        suffixes[".lora_diag"] = "lora_diag"
    modules: dict = {}
    for key, value in weights.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{directory!r}: tensor {key!r} does not start with PEFT's "
                             f"{PREFIX!r}; is this a PEFT LoRA checkpoint?")
        for suffix, role in suffixes.items():
            if key.endswith(suffix):
                modules.setdefault(key[len(PREFIX):-len(suffix)], {})[role] = value
                break
        else:
            raise ValueError(f"{directory!r}: tensor {key!r} is not a LoRA factor of an "
                             "nn.Linear/Conv1D module (DoRA magnitudes, LoRA biases, embedding "
                             "or convolution adapters, trainable tokens and modules_to_save are "
                             "not supported by svk.import_peft)")
    needed = set(suffixes.values())
    for name, parts in modules.items():
        if set(parts) != needed:
            raise ValueError(f"{directory!r}: module {name!r} has {sorted(parts)} but needs "
                             f"{sorted(needed)}")
    return modules


def _rank_and_alpha(config: dict, name: str) -> tuple[int, float]:
    """The module's r and lora_alpha as PEFT resolves them (get_pattern_key: the first
    pattern key matching the name's tail)."""
    def lookup(patterns: dict, default):
        for key in patterns:
            if _pattern_matches(key, name):
                return patterns[key]
        return default
    return (lookup(config.get("rank_pattern") or {}, config.get("r", 8)),
            lookup(config.get("alpha_pattern") or {}, config.get("lora_alpha", 8)))


def _kasa_truncate(weight: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """PEFT's KaSA base rewrite, the same computation (fp32 torch.linalg.svd; keep the top
    min(out, in) − r components): (truncated weight in the weight's dtype, removed b (out, r),
    removed a (r, in)) with truncated + b·a = weight."""
    out_features, in_features = weight.shape
    k = min(out_features, in_features)
    U, S, Vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    keep = k - r
    truncated = ((U[:, :keep] * S[:keep]) @ Vh[:keep]).to(weight.dtype)
    return truncated, U[:, keep:] * S[keep:], Vh[keep:]


def import_peft(model: nn.Module, directory: str | os.PathLike, *,
                backend: str = "auto") -> InjectionSummary:
    """Injects svk layers into a plain base model from a PEFT LoRA checkpoint (or a PEFT KaSA
    one), in place, so that the model computes what ``peft.PeftModel.from_pretrained(model,
    directory)`` computes; the adapter tensors train (LoRA: a, b; KaSA: a, s, b), everything
    else is frozen, as after svk.inject.

    Raises ValueError, changing nothing, for checkpoints of other PEFT methods, for PEFT
    features svk does not have (DoRA, lora_bias, modules_to_save, non-Linear targets, …),
    for modules the model does not have or that are not nn.Linear/Conv1D, and for ranks that
    disagree with the config."""
    from svk.nn import KaSALinear, LoRALinear

    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{directory!r} has no {CONFIG_NAME}; is it a PEFT checkpoint?")
    with open(config_path) as handle:
        config = json.load(handle)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path!r}: peft_type is {config.get('peft_type')!r}; "
                         "svk.import_peft reads LoRA (and LoRA with kasa_config) checkpoints")
    unsupported = _unsupported(config)
    if unsupported:
        raise ValueError(f"{config_path!r} uses PEFT features svk does not support: "
                         f"{'; '.join(unsupported)}")
    kasa = config.get("kasa_config")
    root = _unwrap(model)
    if adapted_layers(root):
        raise ValueError("the model already holds svk adapter layers; import_peft needs the "
                         "plain base model")
    if hasattr(root, "peft_config"):
        raise ValueError("the model is a PEFT model; pass the plain base model (or use PEFT's "
                         "unload()) to import_peft")
    modules = _per_module(_read_weights(directory), kasa is not None, directory)
    named = dict(root.named_modules())

    plans = []
    for name, parts in modules.items():       # validate everything before changing anything
        module = named.get(name)
        if module is None:
            raise ValueError(f"the checkpoint adapts {name!r}, which the model does not have "
                             "(is it the base model the adapter was trained on?)")
        if not is_adaptable(module):
            raise ValueError(f"the checkpoint adapts {name!r}, a {type(module).__name__}; "
                             "svk.import_peft supports nn.Linear and Conv1D targets only")
        weight, bias = base_weight(module)         # dequantized for a quantized layer
        out_features, in_features = weight.shape
        A, B = parts["lora_A"], parts["lora_B"]
        r = A.shape[0]
        if (A.dim() != 2 or B.dim() != 2 or tuple(A.shape) != (r, in_features)
                or tuple(B.shape) != (out_features, r)):
            raise ValueError(f"module {name!r} is ({out_features}, {in_features}) but the "
                             f"checkpoint has lora_A {tuple(A.shape)} and lora_B "
                             f"{tuple(B.shape)} (expected (r, {in_features}), "
                             f"({out_features}, r))")
        r_config, alpha = _rank_and_alpha(config, name)
        if r_config != r:
            raise ValueError(f"module {name!r}: lora_A has rank {r} but the config (r / "
                             f"rank_pattern) says {r_config}")
        if kasa is not None and tuple(parts["lora_diag"].shape) != (r,):
            raise ValueError(f"module {name!r}: lora_diag has shape "
                             f"{tuple(parts['lora_diag'].shape)}, expected ({r},)")
        if kasa is not None and is_conv1d(module):
            raise ValueError(f"module {name!r} is a Conv1D; PEFT's KaSA supports nn.Linear only")
        if kasa is not None and r >= min(out_features, in_features):
            raise ValueError(f"module {name!r}: KaSA rank {r} must be < min(out, in) = "
                             f"{min(out_features, in_features)}")
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        plans.append((name, module, weight, bias, parts, r, alpha, scaling))

    from svk.ops._checks import dropout as _check_dropout
    dropout = _check_dropout(float(config.get("lora_dropout") or 0.0))    # PEFT's lora_dropout
    for param in root.parameters():
        param.requires_grad_(False)
    built = {}
    with torch.no_grad():
        for name, module, weight, bias, parts, r, alpha, scaling in plans:
            dtype = adapter_dtype(weight.dtype)
            cast = dict(device=weight.device, dtype=dtype)
            a, b = parts["lora_A"].to(**cast), parts["lora_B"].to(**cast)
            if is_conv1d(module):
                weight = weight.contiguous()      # (out, in) copy of Conv1D's (in, out)
            if kasa is None:
                hp = LoRALinear.resolve_hparams(rank=r, alpha=alpha)
                args = dict(a=a, s=torch.ones(r, **cast), b=b, scaling=scaling,
                            backend=backend, hparams=hp)
                # a quantized module is kept as the base, untouched (svk.nn.quantized)
                layer = (quantized_class(LoRALinear)(module, **args) if is_quantized(module)
                         else LoRALinear(weight, bias, **args))
            else:
                hp = KaSALinear.resolve_hparams(rank=r, alpha=alpha,
                                                beta=kasa.get("beta", 1e-4),
                                                gamma=kasa.get("gamma", 1e-3))
                truncated, removed_b, removed_a = _kasa_truncate(weight, r)
                args = dict(a=a, s=parts["lora_diag"].to(**cast), b=b, scaling=scaling,
                            backend=backend, hparams=hp, base_removed=(removed_b, removed_a))
                layer = (quantized_class(KaSALinear)(module, **args) if is_quantized(module)
                         else KaSALinear(truncated, bias, **args))
            layer.from_conv1d = is_conv1d(module)
            layer.dropout = dropout
            built[name] = layer
    for name, layer in built.items():
        parent, _, child = name.rpartition(".")
        setattr(named[parent] if parent else root, child, layer)

    method = "kasa" if kasa is not None else "lora"
    hparams = {"rank": config.get("r", 8), "alpha": config.get("lora_alpha", 8)}
    if kasa is not None:
        hparams.update(beta=kasa.get("beta", 1e-4), gamma=kasa.get("gamma", 1e-3))
    root._svk_config = AdapterConfig(method=method, target_modules=sorted(built), seed=None,
                                     backend=backend, dropout=dropout, **hparams)
    count = trainable_parameters(root)
    return InjectionSummary(
        method=method,
        layers=[LayerSummary(name, method, layer.in_features, layer.out_features, layer.rank,
                             layer.num_trainable()) for name, layer in built.items()],
        trainable=count.trainable, total=count.total)
