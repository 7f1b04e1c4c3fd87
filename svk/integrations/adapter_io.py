"""Adapter files: save_adapter / load_adapter / read_adapter.

File format (format_version "1"; stable — svk.serving's AdapterBank reads it):

A safetensors file holding only adapter tensors, never base weights.

Tensor keys: ``<qualified module name>.<tensor>``, the module name as in
``model.named_modules()`` of the unwrapped model (no DDP "module." prefix) and the tensor
one of a, s, b, core, lambdas, gate_in, gate_out, out_scale in nn.Linear layouts
(a (r, in), s (r,), b (out, r), core (r, r), lambdas (m, r), gate_in (r,), gate_out (m,),
out_scale (out,)), e.g. ``model.layers.0.self_attn.q_proj.core``. Which tensors are stored:
  - every trainable tensor (LoRA-XS: core; SiVA: s; SARA/KaSA: a, s, b; LoRA/PiSSA: a, b;
    Mo-SARA: lambdas, gate_in, gate_out, out_scale) — loaded;
  - every frozen 1-D tensor (LoRA-XS's s = the base's top singular values; LoRA/PiSSA's s = 1)
    — a fingerprint of the base weights, compared on load, never copied;
  - with ``include_frozen=True`` also the frozen matrices (LoRA-XS/SiVA/Mo-SARA's a and b)
    — loaded, which makes the file independent of re-running the SVD at injection.
Tensors are saved in the dtype they have in the model (fp32 by default).

Metadata (all values strings, as safetensors requires):
  format          "svk.adapter"
  format_version  "1"
  method          "lora_xs" | "sara" | "mosara" | "kasa" | "siva" | "lora" | "pissa"
  svk_version     svk.__version__ of the writer
  config          the AdapterConfig as JSON (see AdapterConfig.to_json), or "null" when the
                  layers were built with from_linear rather than inject
  layers          JSON object, module name -> {"in_features": int, "out_features": int,
                  "rank": int, "scaling": float, "hparams": {...},
                  "tensors": {tensor: "trainable" | "check" | "frozen"}}
                  ("check": the frozen 1-D fingerprint above; "frozen": a frozen matrix
                  stored with include_frozen=True)

KaSA and PiSSA rewrite the base weight at injection (bottom-r removed; residual of the
principal part): the file does not hold it; injecting the same config into the same base
model rebuilds it deterministically (AdapterConfig.seed).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from svk.integrations.inject import _require_layers, _unwrap

FORMAT = "svk.adapter"
FORMAT_VERSION = "1"


@dataclass
class AdapterFile:
    """A parsed adapter file: tensors (key -> CPU tensor) and the metadata, decoded."""

    tensors: dict
    method: str
    config: dict | None
    layers: dict
    svk_version: str
    format_version: str


def _roles(layer) -> dict:
    roles = {}
    for name, tensor in layer.adapter_tensors().items():
        if tensor.requires_grad:
            roles[name] = "trainable"
        elif tensor.dim() == 1:
            roles[name] = "check"
        else:
            roles[name] = "frozen"
    return roles


def save_adapter(model: nn.Module, path: str | os.PathLike, *,
                 include_frozen: bool = False) -> None:
    """Writes the model's adapter tensors and metadata (see the module docstring) to a
    safetensors file. Raises ValueError when the model has no svk layers, mixes methods, or
    has merged layers (unmerge first: merged tensors live in the base weight)."""
    from safetensors.torch import save_file

    import svk

    layers = _require_layers(model)
    methods = {layer.method for layer in layers.values()}
    if len(methods) != 1:
        raise ValueError(f"the model mixes adapter methods {sorted(methods)}; one file holds one")
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"layers {merged[:3]} are merged; call svk.unmerge(model) before saving")
    tensors, layer_meta = {}, {}
    for name, layer in layers.items():
        roles = _roles(layer)
        if not include_frozen:
            roles = {k: v for k, v in roles.items() if v != "frozen"}
        for tensor_name in roles:
            tensors[f"{name}.{tensor_name}"] = (
                getattr(layer, tensor_name).detach().to("cpu").contiguous())
        layer_meta[name] = {"in_features": layer.in_features, "out_features": layer.out_features,
                            "rank": layer.rank, "scaling": layer.scaling,
                            "hparams": layer.hparams, "tensors": roles}
    cfg = getattr(_unwrap(model), "_svk_config", None)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": methods.pop(),
                "svk_version": svk.__version__,
                "config": cfg.to_json() if cfg is not None else "null",
                "layers": json.dumps(layer_meta, sort_keys=True)}
    save_file(tensors, os.fspath(path), metadata=metadata)


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Reads and parses an adapter file; raises ValueError when it is not an svk adapter."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not an svk adapter file (metadata format="
                             f"{metadata.get('format')!r}, expected {FORMAT!r})")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{os.fspath(path)!r} has adapter format version "
                             f"{metadata.get('format_version')!r}; this svk reads "
                             f"{FORMAT_VERSION!r}")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return AdapterFile(tensors=tensors, method=metadata["method"],
                       config=json.loads(metadata["config"]),
                       layers=json.loads(metadata["layers"]),
                       svk_version=metadata.get("svk_version", "?"),
                       format_version=metadata["format_version"])


def _check(file: AdapterFile, layers) -> list:
    """Every check load_adapter makes, before anything is copied; returns the copy plan."""
    methods = {layer.method for layer in layers.values()}
    if methods != {file.method}:
        raise ValueError(f"the adapter file holds a {file.method!r} adapter but the model is "
                         f"injected with {sorted(methods)}")
    missing = sorted(set(file.layers) - set(layers))
    unexpected = sorted(set(layers) - set(file.layers))
    if missing or unexpected:
        raise ValueError(f"adapter layers differ: in the file but not the model {missing[:5]}, "
                         f"in the model but not the file {unexpected[:5]}")
    plan = []
    for name, layer in layers.items():
        meta = file.layers[name]
        if layer.merged:
            raise ValueError(f"layer {name!r} is merged; call svk.unmerge(model) before loading")
        shape, file_shape = ((layer.out_features, layer.in_features),
                             (meta["out_features"], meta["in_features"]))
        if shape != file_shape:
            raise ValueError(f"layer {name!r}: base shape (out, in) {shape} in the model but "
                             f"{file_shape} in the file")
        if layer.rank != meta["rank"]:
            raise ValueError(f"layer {name!r}: rank {layer.rank} in the model but {meta['rank']} "
                             "in the file (different rank, tau or perc, or a different base)")
        if not math.isclose(layer.scaling, meta["scaling"], rel_tol=1e-9):
            raise ValueError(f"layer {name!r}: scaling {layer.scaling} in the model but "
                             f"{meta['scaling']} in the file (different alpha)")
        params = layer.adapter_tensors()
        for tensor_name, role in meta["tensors"].items():
            key = f"{name}.{tensor_name}"
            if key not in file.tensors:
                raise ValueError(f"the file's metadata lists {key!r} but the tensor is missing")
            if tensor_name not in params:
                raise ValueError(f"layer {name!r} has no tensor {tensor_name!r} to load")
            value, target = file.tensors[key], params[tensor_name]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{key}: shape {tuple(value.shape)} in the file but "
                                 f"{tuple(target.shape)} in the model")
            if role == "check":
                model_value = target.detach().double().cpu()
                if not torch.allclose(value.double(), model_value, rtol=1e-4,
                                      atol=1e-6 * float(model_value.abs().max().clamp(min=1))):
                    raise ValueError(f"{key} differs between the file and the model: the adapter "
                                     "was trained on different base weights")
            else:
                plan.append((target, value))
        absent = [n for n in layer.trainable_names() if n not in meta["tensors"]]
        if absent:
            raise ValueError(f"layer {name!r}: trainable tensors {absent} are not in the file")
    return plan


def load_adapter(model: nn.Module, path: str | os.PathLike) -> AdapterFile:
    """Loads an adapter file into a model injected with the same method and shapes.

    Everything is validated first (method, layer names, base shapes, ranks, scaling, tensor
    shapes, the base-weight fingerprints); on any mismatch a ValueError is raised and the model
    is left unchanged. Returns the parsed file (its config and metadata)."""
    file = read_adapter(path)
    plan = _check(file, _require_layers(model))
    with torch.no_grad():
        for target, value in plan:
            target.copy_(value.to(device=target.device, dtype=target.dtype))
    return file
