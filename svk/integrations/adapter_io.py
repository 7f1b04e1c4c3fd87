"""Adapter files: save_adapter / load_adapter / read_adapter.

File format (format_version "2"; "1" is still read; svk.serving's AdapterBank reads both):

A safetensors file holding adapter tensors, a fingerprint of each adapted base weight and the
modules of ``AdapterConfig.modules_to_save`` — never the base weights themselves.

Tensor keys: ``<qualified module name>.<tensor>``, the module name as in
``model.named_modules()`` of the unwrapped model (no DDP "module." prefix), e.g.
``model.layers.0.self_attn.q_proj.core``:
  - adapter tensors, one of a, s, b, core, lambdas, gate_in, gate_out, out_scale in nn.Linear
    layouts (a (r, in), s (r,), b (out, r), core (r, r), lambdas (m, r), gate_in (r,),
    gate_out (m,), out_scale (out,)), each with a role in the layer's metadata:
      "trainable"  every tensor the method trains (``type(layer).TRAINABLE``: LoRA-XS core;
                   SiVA s; SARA/KaSA a, s, b; LoRA/PiSSA a, b; Mo-SARA lambdas, gate_in,
                   gate_out, out_scale), whatever requires_grad says at save time, plus any
                   other adapter tensor that requires grad at save (unfrozen by hand) — loaded;
      "check"      the other 1-D tensors (LoRA-XS's s = the base's top singular values;
                   LoRA/PiSSA's s = 1) — compared on load, never copied;
      "frozen"     with ``include_frozen=True`` the other matrices (LoRA-XS/SiVA/Mo-SARA's
                   a and b) — loaded, which makes the file independent of the SVD at injection;
  - ``<layer>.base_fingerprint`` (version 2): a (8, 8) float64 sketch Pᵀ·W·Q of the layer's
    ORIGINAL base weight W (out, in) (for KaSA and PiSSA the weight before the method rewrote
    it, SVLinear.original_weight()), with fixed ±1 probe matrices P (out, 8) and Q (in, 8)
    from an integer hash (no RNG, so the same on every machine and torch version; see
    _probe). Computed in float64, in row blocks; compared on load (see _check_fingerprint);
  - ``<module>.<state_dict key>`` (version 2): the full parameters and persistent buffers of
    each module named by AdapterConfig.modules_to_save (e.g. ``score.weight``) — loaded.
Tensors are saved in the dtype they have in the model (fp32 adapter tensors by default).

Metadata (all values strings, as safetensors requires):
  format          "svk.adapter"
  format_version  "2" ("1": no fingerprint, base or modules entries)
  method          "lora_xs" | "sara" | "mosara" | "kasa" | "siva" | "lora" | "pissa"
  svk_version     svk.__version__ of the writer
  config          the AdapterConfig as JSON (see AdapterConfig.to_json), or "null" when the
                  layers were built with from_linear rather than inject
  layers          JSON object, module name -> {"in_features": int, "out_features": int,
                  "rank": int, "scaling": float, "hparams": {...},
                  "tensors": {tensor: "trainable" | "check" | "frozen"},
                  "base": {"dtype": "float32" | "bfloat16" | …, "frobenius": ‖W‖_F}} ("base"
                  from version 2: the original base weight's dtype and Frobenius norm)
  fingerprint     (version 2) JSON {"kind": "pm1_hash_sketch", "probes": 8}
  modules         (version 2) JSON object, module name -> {state_dict key: "module"}

Loading (load_adapter) validates everything before it copies anything; tensors it copies must
be floating point and finite, and are cast to the model's dtype only when every value survives
the cast exactly (bf16/fp16 -> fp32 always; fp64 -> fp32 only for values fp32 holds exactly).

KaSA and PiSSA rewrite the base weight at injection (bottom-r removed; residual of the
principal part): the file does not hold it; injecting the same config into the same base
model rebuilds it deterministically (AdapterConfig.seed).

Under FSDP2 (torch.distributed.fsdp.fully_shard) save_adapter and load_adapter are collective:
every rank calls them; save gathers each sharded tensor (DTensor.full_tensor()) and rank 0
alone writes the file.
"""
from __future__ import annotations

import errno
import json
import math
import numbers
import os
import re
import secrets
import stat
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from svk.integrations._fingerprint import PROBES, _probe, sketch, unit_roundoff  # noqa: F401
from svk.integrations.inject import _require_layers, _unwrap

FORMAT = "svk.adapter"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
ROLES = ("trainable", "check", "frozen")
MODULE_ROLE = "module"
FINGERPRINT_SUFFIX = "base_fingerprint"
FINGERPRINT_KIND = "pm1_hash_sketch"
_REQUIRED = ("format", "format_version", "method", "config", "layers")
_REQUIRED_V2 = ("fingerprint", "modules")


@dataclass
class AdapterFile:
    """A parsed adapter file: tensors (key -> CPU tensor) and the metadata, decoded.

    modules: module name -> {state_dict key: "module"} (AdapterConfig.modules_to_save);
    fingerprint: {"kind", "probes"} or None for a version-1 file; path: where it was read."""

    tensors: dict
    method: str
    config: dict | None
    layers: dict
    svk_version: str
    format_version: str
    modules: dict = field(default_factory=dict)
    fingerprint: dict | None = None
    path: str = ""


# ---- base-weight fingerprint ----------------------------------------------------------------
def _layer_sketch(layer) -> tuple[Tensor, float]:
    """The fingerprint of a layer's original base weight (gathered first under FSDP2)."""
    if not layer.weight.is_floating_point():
        raise TypeError(f"{type(layer).__name__}: the base weight is {layer.weight.dtype}; the "
                        "adapter file's base fingerprint needs a floating-point weight")
    removed = None
    if getattr(layer, "base_removed_b", None) is not None:
        removed = (_full(layer.base_removed_b), _full(layer.base_removed_a))
    return sketch(_full(layer.weight), removed)


def _check_fingerprint(name: str, file: AdapterFile, stored: Tensor, model_sketch,
                       model_dtype: torch.dtype) -> None:
    """Raises unless the model's original base weight matches the file's.

    Tolerance. With ±1 probes, E[(pᵀ·E·q)²] = ‖E‖²_F for any E, so the sketches of two weights
    that differ by E are ≈ PROBES·‖E‖_F apart. The same base stored in two dtypes differs by
    at most one rounding of the coarser one, ‖E‖_F ≤ u·‖W‖_F (u its unit roundoff: 2⁻⁸ bf16,
    2⁻¹¹ fp16, 2⁻²⁴ fp32 — also the floor, as KaSA/PiSSA's factors are computed in fp32), and
    the KaSA/PiSSA original recovered from a rounded residual adds one more rounding. So we
    allow 4·u·PROBES·‖W‖_F (2× margin over two roundings; measured same-base distances are
    0.3–0.6·PROBES·u·‖W‖_F, a different base's ≈ √2·PROBES·‖W‖_F: √2/(4u) ≈ 90× above
    the allowance at bf16, 2.3·10⁶× at fp32).
    """
    meta = file.layers[name]["base"]
    model_value, model_norm = model_sketch
    file_dtype = getattr(torch, meta["dtype"])
    u = max(unit_roundoff(file_dtype), unit_roundoff(model_dtype), 2.0 ** -24)
    scale = max(model_norm, meta["frobenius"])
    tolerance = 4 * u * PROBES * scale
    distance = float(torch.linalg.norm(stored - model_value))
    norm_gap = abs(model_norm - meta["frobenius"])
    if distance <= tolerance and norm_gap <= 4 * u * scale:
        return
    relative = distance / max(PROBES * scale, 1e-300)
    dtypes = (f"the file's base was {meta['dtype']} and the model's is "
              f"{str(model_dtype).removeprefix('torch.')}; the difference is beyond the rounding "
              f"of the coarser dtype (u = {u:.3g}), so it is not a dtype difference alone"
              if file_dtype != model_dtype else f"both bases are {meta['dtype']}")
    raise ValueError(f"{file.path}: layer {name!r}: the base weight differs from the one the "
                     f"adapter was trained on (fingerprint distance {relative:.3g}·‖W‖ vs at "
                     f"most {4 * u:.3g}·‖W‖ allowed; ‖W‖_F {model_norm:.6g} in the model, "
                     f"{meta['frobenius']:.6g} in the file; {dtypes}): the adapter was trained "
                     "on different base weights; load it into the base model it was trained on")


def check_base(file: AdapterFile, layer_name: str, weight: Tensor,
               removed: tuple[Tensor, Tensor] | None = None) -> None:
    """Raises ValueError unless ``weight`` (+ removed b·a for KaSA/PiSSA) — the original base
    weight of ``layer_name`` — matches the fingerprint the file recorded (format 2; a format-1
    file records none and passes). For readers that hold their own layers (AdapterBank)."""
    if file.format_version == "1":
        return
    if layer_name not in file.layers:
        raise ValueError(f"{file.path}: the file has no layer {layer_name!r}")
    _check_fingerprint(layer_name, file, file.tensors[f"{layer_name}.{FINGERPRINT_SUFFIX}"],
                       sketch(_full(weight), removed), weight.dtype)


# ---- saving ---------------------------------------------------------------------------------
def _trained(layer) -> set:
    """The adapter tensors the method trains (type(layer).TRAINABLE); a generic SVLinear
    names no method, so all of its adapter tensors count as trained."""
    names = set(layer.adapter_tensors())
    method_trains = set(type(layer).TRAINABLE)
    return names & method_trains if method_trains else names


def _roles(layer, include_frozen: bool) -> dict:
    trained = _trained(layer)
    roles = {}
    for name, tensor in layer.adapter_tensors().items():
        # requires_grad only adds: a tensor unfrozen by hand is kept, never reduced to a check;
        # freezing the model before export removes nothing.
        if name in trained or tensor.requires_grad:
            roles[name] = "trainable"
        elif tensor.dim() == 1:
            roles[name] = "check"
        elif include_frozen:
            roles[name] = "frozen"
    return roles


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def _full(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor (FSDP2 shard) is gathered — a collective every rank must
    join, in the same order."""
    t = t.detach()
    return t.full_tensor() if _is_dtensor(t) else t


def _to_file(t: Tensor) -> Tensor:
    # clone: a tied or sliced tensor must not share storage with another (safetensors refuses)
    return _full(t).to("cpu").clone(memory_format=torch.contiguous_format)


def _name_matches(name: str, wanted: str) -> bool:
    return name == wanted or name.endswith("." + wanted)


def _modules_to_save(model: nn.Module, layers) -> dict:
    """Module name -> module for AdapterConfig.modules_to_save (outermost matches only)."""
    cfg = getattr(model, "_svk_config", None)
    wanted = list(getattr(cfg, "modules_to_save", None) or [])
    if not wanted:
        return {}
    found: dict = {}
    matched = set()
    for name, module in model.named_modules():
        hits = [w for w in wanted if name and _name_matches(name, w)]
        if not hits:
            continue
        matched.update(hits)
        if any(name.startswith(outer + ".") for outer in found):
            continue                 # inside a module already saved whole
        inner = [n for n in layers if n == name or n.startswith(name + ".")]
        if inner:
            raise ValueError(f"modules_to_save entry {hits[0]!r} matches {name!r}, which holds "
                             f"the adapter layer(s) {inner[:3]}; a module is either adapted or "
                             "saved whole, not both")
        found[name] = module
    unmatched = [w for w in wanted if w not in matched]
    if unmatched:
        raise ValueError(f"modules_to_save entries {unmatched} match no module of the model; "
                         "nothing of them could be saved")
    return found


def _distributed(tensors) -> tuple[bool, int]:
    """(the model is sharded with DTensors, this process's rank)."""
    if not any(_is_dtensor(t) for t in tensors):
        return False, 0
    import torch.distributed as dist
    return True, dist.get_rank()


def save_adapter(model: nn.Module, path: str | os.PathLike, *,
                 include_frozen: bool = False) -> None:
    """Writes the model's adapter tensors, base fingerprints, modules_to_save and metadata
    (see the module docstring) to a safetensors file, atomically (a temporary file in the same
    directory, then os.replace), with the permission bits a plain open() would give (0666 less
    the umask; an existing file keeps its mode).

    What is stored depends on the method, never on requires_grad at save time. Raises
    ValueError when the model has no svk layers, mixes methods, or has merged layers (unmerge
    first: merged tensors live in the base weight); OSError naming ``path`` when it cannot be
    written. Under FSDP2 every rank must call it; rank 0 writes."""
    import svk

    path = os.fspath(path)
    layers = _require_layers(model)
    methods = {layer.method for layer in layers.values()}
    if len(methods) != 1:
        raise ValueError(f"the model mixes adapter methods {sorted(methods)}; one file holds one")
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"layers {merged[:3]} are merged; call svk.unmerge(model) before saving")
    unwrapped = _unwrap(model)
    modules = _modules_to_save(unwrapped, layers)
    sharded, rank = _distributed([p for layer in layers.values() for p in layer.parameters()]
                                 + [p for m in modules.values() for p in m.parameters()])

    tensors, layer_meta = {}, {}
    for name, layer in layers.items():
        roles = _roles(layer, include_frozen)
        for tensor_name in roles:
            tensors[f"{name}.{tensor_name}"] = _to_file(getattr(layer, tensor_name))
        fingerprint, norm = _layer_sketch(layer)
        tensors[f"{name}.{FINGERPRINT_SUFFIX}"] = fingerprint
        layer_meta[name] = {"in_features": layer.in_features, "out_features": layer.out_features,
                            "rank": layer.rank, "scaling": layer.scaling,
                            "hparams": layer.hparams, "tensors": roles,
                            "base": {"dtype": str(layer.weight.dtype).removeprefix("torch."),
                                     "frobenius": norm}}
    module_meta = {}
    for name, module in modules.items():
        state = module.state_dict(keep_vars=True)
        module_meta[name] = {key: MODULE_ROLE for key in state}
        for key, value in state.items():
            tensors[f"{name}.{key}"] = _to_file(value)
    cfg = getattr(unwrapped, "_svk_config", None)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": methods.pop(),
                "svk_version": svk.__version__,
                "config": cfg.to_json() if cfg is not None else "null",
                "layers": json.dumps(layer_meta, sort_keys=True),
                "fingerprint": json.dumps({"kind": FINGERPRINT_KIND, "probes": PROBES}),
                "modules": json.dumps(module_meta, sort_keys=True)}
    if not sharded:
        _write(tensors, metadata, path)
        return
    import torch.distributed as dist
    failure = [None]
    if rank == 0:
        try:
            _write(tensors, metadata, path)
        except OSError as error:
            failure[0] = (error.errno, str(error))
    dist.broadcast_object_list(failure, src=0)       # also the barrier: the file exists now
    if failure[0] is not None:
        raise OSError(failure[0][0], f"rank 0 could not write the adapter file {path!r}: "
                      f"{failure[0][1]}", path)


def _new_file_mode(path: str, fd: int) -> int:
    """The permission bits open(path, "wb") would leave: an existing file keeps its own; a new
    one gets 0666 less the umask — read from a file we just created with 0666 (os.umask would
    change the umask of the whole process, racing other threads)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return stat.S_IMODE(os.fstat(fd).st_mode)


def _write(tensors: dict, metadata: dict, path: str) -> None:
    """Atomic write: safetensors writes a temporary file in the target's directory, which gets
    the mode a plain open() would give and is then renamed over ``path``."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "cannot write the adapter file: it is a directory",
                                path)
    directory, base = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:
        raise OSError(error.errno, f"cannot write the adapter file: {error.strerror}",
                      path) from error
    try:
        mode = _new_file_mode(path, fd)
        os.close(fd)
        save_file(tensors, temporary, metadata=metadata)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except (OSError, SafetensorError) as error:
        code, reason = getattr(error, "errno", None), getattr(error, "strerror", None)
        if code is None:
            # safetensors reports I/O errors as text: "… I/O error: … (os error 28) at path …"
            found = re.search(r"\(os error (\d+)\)", str(error))
            code = int(found.group(1)) if found else errno.EIO
            reason = (os.strerror(code) if found
                      else str(error).replace(temporary, "<temporary file>"))
        raise OSError(code, f"cannot write the adapter file: {reason}", path) from error
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)


# ---- reading --------------------------------------------------------------------------------
def _bad(path: str, what: str) -> ValueError:
    return ValueError(f"{path!r} is not a valid svk adapter file: {what}")


def _json(path: str, metadata: dict, key: str):
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as error:
        raise _bad(path, f"metadata {key!r} is not valid JSON ({error})") from None


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


_FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}


def _validate_layers(path: str, layers, version: str) -> None:
    if not isinstance(layers, dict) or not layers:
        raise _bad(path, "metadata 'layers' must be a non-empty JSON object")
    for name, meta in layers.items():
        where = f"metadata of layer {name!r}"
        if not isinstance(meta, dict):
            raise _bad(path, f"{where} must be a JSON object, got {meta!r}")
        needed = ["in_features", "out_features", "rank", "scaling", "hparams", "tensors"]
        needed += ["base"] if version != "1" else []
        missing = [key for key in needed if key not in meta]
        if missing:
            raise _bad(path, f"{where} lacks {missing}")
        for key in ("in_features", "out_features", "rank"):
            if not _is_int(meta[key]) or meta[key] < 1:
                raise _bad(path, f"{where}: {key} must be a positive int, got {meta[key]!r}")
        if not _is_real(meta["scaling"]):
            raise _bad(path, f"{where}: scaling must be a finite number, got {meta['scaling']!r}")
        if not isinstance(meta["hparams"], dict):
            raise _bad(path, f"{where}: hparams must be a JSON object")
        roles = meta["tensors"]
        if not isinstance(roles, dict):
            raise _bad(path, f"{where}: tensors must be a JSON object")
        for tensor_name, role in roles.items():
            if role not in ROLES:
                raise _bad(path, f"{where}: tensor {tensor_name!r} has the unknown role "
                                 f"{role!r} (known roles: {ROLES}; written by a newer svk?)")
        if version != "1":
            base = meta["base"]
            if (not isinstance(base, dict) or base.get("dtype") not in _FLOAT_DTYPES
                    or not _is_real(base.get("frobenius")) or base["frobenius"] < 0):
                raise _bad(path, f"{where}: base must be {{'dtype': one of "
                                 f"{sorted(_FLOAT_DTYPES)}, 'frobenius': a number ≥ 0}}, got "
                                 f"{base!r}")


def _validate_tensors(path: str, file: AdapterFile) -> None:
    """Every key accounted for; dtypes by role; fingerprints well-formed."""
    expected = {}
    for name, meta in file.layers.items():
        for tensor_name, role in meta["tensors"].items():
            expected[f"{name}.{tensor_name}"] = role
        if file.format_version != "1":
            expected[f"{name}.{FINGERPRINT_SUFFIX}"] = "fingerprint"
    for module, keys in file.modules.items():
        for key in keys:
            full = f"{module}.{key}"
            if full in expected:
                raise _bad(path, f"{full!r} is both an adapter tensor and a module tensor")
            expected[full] = MODULE_ROLE
    missing = sorted(set(expected) - set(file.tensors))
    if missing:
        raise _bad(path, f"the metadata lists tensors the file does not hold: {missing[:5]}")
    unlisted = sorted(set(file.tensors) - set(expected))
    if unlisted:
        raise _bad(path, f"the file holds tensors its metadata does not list: {unlisted[:5]}")
    for key, role in expected.items():
        value = file.tensors[key]
        if role == "fingerprint":
            if (value.dtype != torch.float64 or tuple(value.shape) != (PROBES, PROBES)
                    or not torch.isfinite(value).all()):
                raise _bad(path, f"{key} must be a finite float64 ({PROBES}, {PROBES}) tensor, "
                                 f"got {value.dtype} {tuple(value.shape)}")
        elif role == MODULE_ROLE:
            continue                 # integer buffers are legitimate; checked against the model
        elif not value.is_floating_point():
            raise _bad(path, f"{key} has dtype {value.dtype}; adapter tensors are floating "
                             "point")
        elif not torch.isfinite(value).all():
            raise _bad(path, f"{key} holds NaN or Inf values (a diverged training run?)")


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Reads, parses and validates an adapter file (structure only, not against a model).

    Raises FileNotFoundError / IsADirectoryError naming the path, and ValueError naming the
    path and the defect for anything that is not a well-formed svk adapter file (empty,
    truncated or not safetensors; missing or malformed metadata; unknown roles; tensors of a
    non-floating dtype, NaN/Inf, or not listed in the metadata)."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "an adapter file is expected, not a directory",
                                path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no such adapter file", path)
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as error:
        raise _bad(path, f"not a readable safetensors file ({error}); is it empty, truncated "
                         "or another kind of file?") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not an svk adapter file (metadata format="
                         f"{metadata.get('format')!r}, expected {FORMAT!r})")
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{path!r} has adapter format version {version!r}; this svk reads "
                         f"{READABLE_VERSIONS} (a newer svk wrote it?)")
    required = _REQUIRED + (_REQUIRED_V2 if version != "1" else ())
    missing = [key for key in required if key not in metadata]
    if missing:
        raise _bad(path, f"metadata keys {missing} are missing")
    method = metadata["method"]
    from svk.nn import METHODS
    if method not in METHODS:
        raise _bad(path, f"unknown method {method!r} (known: {sorted(METHODS)})")
    config = _json(path, metadata, "config")
    if config is not None and not isinstance(config, dict):
        raise _bad(path, "metadata 'config' must be a JSON object or null")
    layers = _json(path, metadata, "layers")
    _validate_layers(path, layers, version)
    fingerprint, modules = None, {}
    if version != "1":
        fingerprint = _json(path, metadata, "fingerprint")
        if fingerprint != {"kind": FINGERPRINT_KIND, "probes": PROBES}:
            raise _bad(path, f"unknown base fingerprint {fingerprint!r} (this svk computes "
                             f"{FINGERPRINT_KIND!r} with {PROBES} probes)")
        modules = _json(path, metadata, "modules")
        if not isinstance(modules, dict) or not all(
                isinstance(keys, dict) and all(role == MODULE_ROLE for role in keys.values())
                for keys in modules.values()):
            raise _bad(path, "metadata 'modules' must map module names to {state_dict key: "
                             f"{MODULE_ROLE!r}}}")
    file = AdapterFile(tensors=tensors, method=method, config=config, layers=layers,
                       svk_version=metadata.get("svk_version", "?"), format_version=version,
                       modules=modules, fingerprint=fingerprint, path=path)
    _validate_tensors(path, file)
    return file


# ---- loading --------------------------------------------------------------------------------
def _loadable(path: str, key: str, value: Tensor, target: Tensor) -> Tensor:
    """``value`` in the target's dtype, or ValueError. The rule: the same dtype; or both
    floating and every value survives the cast exactly (so bf16/fp16 -> fp32 and fp32 -> fp64
    always, fp64 -> fp32 only for values fp32 holds exactly: nothing is rounded silently)."""
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"{path}: {key}: shape {tuple(value.shape)} in the file but "
                         f"{tuple(target.shape)} in the model")
    if value.dtype == target.dtype:
        return value
    if not (value.is_floating_point() and target.is_floating_point()):
        raise ValueError(f"{path}: {key} is {value.dtype} in the file but {target.dtype} in the "
                         "model; only floating tensors are converted")
    cast = value.to(target.dtype)
    if not torch.equal(cast.to(value.dtype), value):
        change = float(((cast.to(torch.float64) - value.to(torch.float64)).abs()
                        / value.to(torch.float64).abs().clamp(min=1e-300)).max())
        raise ValueError(f"{path}: {key} is {value.dtype} in the file but {target.dtype} in the "
                         f"model, and the cast would change its values (largest relative change "
                         f"{change:.3g}); load it into a {value.dtype} model "
                         f"(model.to({value.dtype})) or save it from a {target.dtype} one")
    return cast


def _check_values(path: str, key: str, value: Tensor, target: Tensor, norm: float,
                  file_dtype: torch.dtype | None, model_dtype: torch.dtype) -> None:
    """A "check" tensor (LoRA-XS's s: the base's top singular values; s = 1 otherwise) must
    match the model's. Weyl: |σᵢ(W + E) − σᵢ(W)| ≤ ‖E‖₂ ≤ ‖E‖_F ≤ u·‖W‖_F for a rounding E,
    so 4·u·‖W‖_F (two roundings, 2× margin) plus 1e-4 relative for the randomized SVD's
    run-to-run differences. A version-1 file records no base dtype: bf16 is assumed."""
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"{path}: {key}: shape {tuple(value.shape)} in the file but "
                         f"{tuple(target.shape)} in the model")
    u = max(unit_roundoff(file_dtype or torch.bfloat16), unit_roundoff(model_dtype),
            2.0 ** -24)
    ours = _full(target).double().cpu()
    if not torch.allclose(value.double(), ours, rtol=1e-4, atol=4 * u * norm):
        gap = float((value.double() - ours).abs().max())
        raise ValueError(f"{path}: {key} differs between the file and the model by up to "
                         f"{gap:.3g} (allowed {4 * u * norm:.3g} + 1e-4 relative for base "
                         f"dtypes {file_dtype} / {model_dtype}): the adapter was trained on "
                         "different base weights")


def _check_layers(file: AdapterFile, layers) -> list:
    path = file.path
    methods = {layer.method for layer in layers.values()}
    if methods != {file.method}:
        raise ValueError(f"{path}: the adapter file holds a {file.method!r} adapter but the "
                         f"model is injected with {sorted(methods)}")
    missing = sorted(set(file.layers) - set(layers))
    unexpected = sorted(set(layers) - set(file.layers))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter layers differ: in the file but not the model "
                         f"{missing[:5]}, in the model but not the file {unexpected[:5]}")
    if file.format_version == "1":
        warnings.warn(f"{path} is a format-1 adapter file: it records no base-weight "
                      "fingerprint, so only LoRA-XS's singular values check the base; save it "
                      "again to get the check", UserWarning, stacklevel=3)
    plan = []
    for name, layer in layers.items():
        meta = file.layers[name]
        if layer.merged:
            raise ValueError(f"layer {name!r} is merged; call svk.unmerge(model) before loading")
        shape, file_shape = ((layer.out_features, layer.in_features),
                             (meta["out_features"], meta["in_features"]))
        if shape != file_shape:
            raise ValueError(f"{path}: layer {name!r}: base shape (out, in) {shape} in the "
                             f"model but {file_shape} in the file")
        if layer.rank != meta["rank"]:
            raise ValueError(f"{path}: layer {name!r}: rank {layer.rank} in the model but "
                             f"{meta['rank']} in the file (different rank, tau or perc, or a "
                             "different base)")
        if not math.isclose(layer.scaling, meta["scaling"], rel_tol=1e-9):
            raise ValueError(f"{path}: layer {name!r}: scaling {layer.scaling} in the model but "
                             f"{meta['scaling']} in the file (different alpha)")
        params, roles = layer.adapter_tensors(), meta["tensors"]
        trained = _trained(layer)
        # Version 1 decided roles by requires_grad at save: a tensor the method trains that was
        # frozen then is stored as "check"/"frozen" but holds the trained value, so load it.
        absent = sorted(n for n in trained if n not in roles
                        or (roles[n] != "trainable" and file.format_version != "1"))
        if absent:
            raise ValueError(f"{path}: layer {name!r}: {file.method} trains {absent}, which the "
                             "file does not hold as trainable tensors")
        unknown = sorted(set(roles) - set(params))
        if unknown:
            raise ValueError(f"{path}: layer {name!r} has no tensors {unknown} to load")
        model_sketch = _layer_sketch(layer)
        base = meta.get("base")
        file_dtype = getattr(torch, base["dtype"]) if base else None
        for tensor_name, role in roles.items():
            key = f"{name}.{tensor_name}"
            value, target = file.tensors[key], params[tensor_name]
            if role == "check" and tensor_name not in trained:
                _check_values(path, key, value, target, model_sketch[1], file_dtype,
                              layer.weight.dtype)
            else:
                plan.append((target, _loadable(path, key, value, target)))
        if file.format_version != "1":
            _check_fingerprint(name, file, file.tensors[f"{name}.{FINGERPRINT_SUFFIX}"],
                               model_sketch, layer.weight.dtype)
    return plan


def _check_modules(file: AdapterFile, model: nn.Module) -> list:
    path = file.path
    cfg = getattr(model, "_svk_config", None)
    wanted = list(getattr(cfg, "modules_to_save", None) or [])
    lacking = [w for w in wanted if not any(_name_matches(m, w) for m in file.modules)]
    if lacking:
        raise ValueError(f"{path}: the model's AdapterConfig.modules_to_save lists {lacking}, "
                         "but the file holds no such module (saved without modules_to_save, or "
                         "a format-1 file)")
    modules = dict(model.named_modules())
    plan = []
    for name, keys in file.modules.items():
        module = modules.get(name) if name else None
        if module is None:
            raise ValueError(f"{path}: the file holds module {name!r} (modules_to_save), which "
                             "the model does not have")
        state = module.state_dict(keep_vars=True)
        if set(state) != set(keys):
            raise ValueError(f"{path}: module {name!r}: the file holds {sorted(keys)} but the "
                             f"model's module has {sorted(state)}")
        for key in keys:
            plan.append((state[key], _loadable(path, f"{name}.{key}",
                                               file.tensors[f"{name}.{key}"], state[key])))
    return plan


def _copy(target: Tensor, value: Tensor) -> None:
    if _is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor
        # every rank read the same file: each keeps its own shard, no communication
        value = distribute_tensor(value.to(target.to_local().device), target.device_mesh,
                                  target.placements, src_data_rank=None)
        target.copy_(value)
        return
    target.copy_(value.to(device=target.device, dtype=target.dtype))


def load_adapter(model: nn.Module, path: str | os.PathLike) -> AdapterFile:
    """Loads an adapter file into a model injected with the same method and shapes.

    Everything is validated first (the file itself — see read_adapter —, method, layer names,
    base shapes, ranks, scaling, tensor shapes and dtypes, the base-weight fingerprints, the
    modules_to_save); on any mismatch a ValueError naming the file and what differs is raised
    and the model is left unchanged. Returns the parsed file (its config and metadata).
    Under FSDP2 every rank must call it (the fingerprints need the gathered weights)."""
    file = read_adapter(path)
    plan = _check_layers(file, _require_layers(model))
    plan += _check_modules(file, _unwrap(model))
    with torch.no_grad():
        for target, value in plan:
            _copy(target, value)
    return file
