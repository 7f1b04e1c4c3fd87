"""Checkpoints trained with the official LoRA-XS code (MohammadrezaBanaei/LoRA-XS), loaded
into an svk model.

    report = load_lora_xs_official(model, "output/.../ft", AdapterConfig(
        method="lora_xs", rank=64, alpha=64, target_modules=[...]))

How the official code stores an adapter (a PEFT LoRA model whose layers it rewrites,
``utils/initialization_utils.py``): for each target with weight W (out, in) it factorises Wᵀ,
sets ``lora_A.weight`` (r, in) = diag(S)·Vh (S folded into A; it is computed as Bᵀ·W) and
``lora_B.weight`` (out, r) = U, both frozen, and trains ``default_lora_latent_mapping``, an
nn.Linear(r, r) without bias whose weight is R. Its update is scaling·B·R·A with scaling
lora_alpha/r. PEFT's ``save_pretrained`` writes the keys
``base_model.model.<module>.lora_A.weight``, ``….lora_B.weight`` and
``base_model.model.<module>_lora_latent_mapping.weight`` (R); a raw ``state_dict()`` has
``.lora_A.default.weight`` and ``<module>.default_lora_latent_mapping.weight``. Both load.

svk's LoRA-XS layer holds ΔW = scaling·b·core·diag(s)·a with b = U, s = S, a = Vh from its
own SVD. Two things separate the official factors from svk's:

- Signs. Singular vectors are defined up to sign: B = b·D, A = diag(S)·D·a with D diagonal ±1,
  so R cannot be copied as it is; in svk's factors the official update has core = D·R·D. The
  scikit-learn the official requirements pin (0.24: ``TruncatedSVD``, randomized_svd with
  ``svd_flip``) makes the largest entry of each right singular vector of W positive; later
  official commits use torch.linalg.svd, whose signs come from LAPACK.
- Accuracy. The official randomized SVD (n_iter 10, oversampling 10, random_state 42) does not
  find the top singular subspaces of a flat pretrained spectrum accurately, and R was trained in
  the subspaces it found. On MiniLM-L6's layer 0–1 query/value weights its B lies 3e-3–4e-2
  (r = 8) and 6e-2–1.4e-1 (r = 64) from the top-r subspace (relative Frobenius; svk's rsvd is
  within 4e-6 of the exact SVD's on layer 0's query), so re-expressing R in svk's factors
  (D·R·D, or the closest core) changes the update by 0.5–5 % at r = 8 and 7–18 % at r = 64.

So by default (factors="official") the layer takes the checkpoint's own subspaces: b = B,
a = the rows of A normalised, core = R·diag(‖A_i‖/s_i); s stays svk's S (so svk's adapter
files still recognise the base). The output is then the official one exactly.
factors="svk" keeps svk's a, s, b and sets core = (bᵀ·B)·R·(A·aᵀ)·diag(1/s), the closest svk
core (D·R·D when the factors agree up to signs, as for the exact torch.linalg.svd of later
official commits); it refuses checkpoints whose factors are further than ``tol`` from svk's.
Training on from D·R·D is the same as training R: it only flips signs of entries, which SGD
and Adam are equivariant to.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from svk.integrations.config import AdapterConfig
from svk.integrations.inject import adapted_layers, inject
from svk.nn.frozen_basis import LoRAXSLinear

_PREFIX = "base_model.model."
# (suffix, role); ".default_lora_latent_mapping.weight" must be tried before its own suffix
# "_lora_latent_mapping.weight".
_SUFFIXES = ((".default_lora_latent_mapping.weight", "R"), ("_lora_latent_mapping.weight", "R"),
             (".lora_A.default.weight", "A"), (".lora_A.weight", "A"),
             (".lora_B.default.weight", "B"), (".lora_B.weight", "B"))
SIGN_RULES = ("right", "left")
FACTORS = ("svk", "official")


@dataclass
class LayerLoad:
    """What loading did to one layer. factors: "official" (the layer now holds the checkpoint's
    subspaces) or "svk" (R re-expressed in svk's factors). flipped: how many singular-vector
    pairs have opposite signs in the checkpoint and in svk (the −1 entries of D). left_error,
    right_error: how far the checkpoint's B and A lie from svk's b and a subspaces (relative
    Frobenius norm; 0 when they agree up to signs; None when the checkpoint holds only R)."""

    factors: str
    flipped: int
    left_error: float | None
    right_error: float | None


@dataclass
class OfficialLoad:
    """Per-layer LayerLoad by svk layer name, and the checkpoint keys that are not LoRA-XS
    tensors (e.g. a classifier head trained in full), which were not loaded."""

    layers: dict = field(default_factory=dict)
    ignored: list = field(default_factory=list)


def load_lora_xs_official(model, state_dict_or_path, cfg: AdapterConfig, *,
                          factors: str = "official", sign_rule: str | None = None,
                          recompute: bool = False, tol: float = 1e-3) -> OfficialLoad:
    """Loads an official LoRA-XS checkpoint into ``model``, in place; returns an OfficialLoad.

    model: injected with ``cfg`` (LoRA-XS); a model without svk layers is injected first.
    state_dict_or_path: a state dict, a .safetensors / .bin / .pt file, or the official output
        directory (``adapter_model.safetensors`` or ``adapter_model.bin``; its
        ``adapter_config.json``, when present, must agree with cfg's rank and alpha).
    factors="official" (default): the layers take the checkpoint's A and B (module docstring),
        and the output is the official one exactly, whatever SVD made them.
    factors="svk": keep svk's frozen a, s, b and re-express R in them. Refused when the
        checkpoint's A or B lie further than ``tol`` (relative) from svk's subspaces, as they do
        for the scikit-learn-era official code on real weights, for the official
        ``retain_part='bottom'`` and for a different base.
    For a checkpoint that holds R without A and B:
    recompute=True rebuilds A and B as the official code did (scikit-learn's randomized_svd of
        Wᵀ, n_iter 10, random_state 42, config/reconstruct_config.yaml), then loads as above.
        Exact when the installed scikit-learn draws the same random projections as the one
        that trained the checkpoint.
    sign_rule: or keep svk's factors and take the signs from a rule: "right" (each right
        singular vector's largest entry positive: scikit-learn 0.24's TruncatedSVD, the version
        official requirements.txt pins) or "left" (each left singular vector's: newer
        scikit-learn's TruncatedSVD). Exact only if the official SVD was exact (see above).

    Everything is checked before anything is copied: on a ValueError no tensor has changed
    (a model that had no svk layers stays injected).

    After factors="official" (or recompute=True) the layers' a and b are the checkpoint's, not
    what injecting cfg computes: save with ``svk.save_adapter(model, path,
    include_frozen=True)`` so that the file carries them.
    """
    if not isinstance(cfg, AdapterConfig) or cfg.method != "lora_xs":
        raise ValueError(f"cfg must be an AdapterConfig with method='lora_xs', got {cfg!r}")
    if factors not in FACTORS:
        raise ValueError(f"factors must be one of {FACTORS}, got {factors!r}")
    if sign_rule is not None and sign_rule not in SIGN_RULES:
        raise ValueError(f"sign_rule must be one of {SIGN_RULES} or None, got {sign_rule!r}")
    if recompute and sign_rule is not None:
        raise ValueError("give recompute=True or sign_rule, not both")
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
    hp = cfg.hparams()
    state, official_config = _read(state_dict_or_path)
    if official_config is not None:
        _check_official_config(official_config, hp)
    entries, ignored = _parse(state)

    if not adapted_layers(model):
        inject(model, cfg, progress=False)
    layers = adapted_layers(model)
    _check_layers(layers, hp)
    missing = sorted(set(layers) - set(entries))
    unexpected = sorted(set(entries) - set(layers))
    if missing or unexpected:
        raise ValueError(f"LoRA-XS layers differ: in the model but not the checkpoint "
                         f"{missing[:5]}, in the checkpoint but not the model {unexpected[:5]} "
                         f"(checkpoint keys are matched after removing {_PREFIX!r})")

    plan, report = [], OfficialLoad(ignored=ignored)
    for name, layer in layers.items():
        roles = entries[name]
        if recompute and "A" not in roles:
            roles = dict(roles)
            roles["A"], roles["B"] = official_factors(layer.original_weight(), layer.rank)
        tensors, layer_report = _plan_layer(name, layer, roles, factors=factors,
                                            sign_rule=sign_rule, tol=tol)
        plan.append((layer, tensors))
        report.layers[name] = layer_report
    with torch.no_grad():
        for layer, tensors in plan:
            for tensor_name, value in tensors.items():
                target = getattr(layer, tensor_name)
                target.copy_(value.to(device=target.device, dtype=target.dtype))
    return report


# ---- reading --------------------------------------------------------------------------------

def _read(source):
    """(state dict, the official adapter_config.json as a dict or None)."""
    if isinstance(source, Mapping):
        return dict(source), None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"state_dict_or_path must be a state dict or a path, got "
                        f"{type(source).__name__}")
    path = os.fspath(source)
    official_config = None
    if os.path.isdir(path):
        config_path = os.path.join(path, "adapter_config.json")
        if os.path.isfile(config_path):
            with open(config_path) as handle:
                official_config = json.load(handle)
        for name in ("adapter_model.safetensors", "adapter_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise ValueError(f"{source!r} holds neither adapter_model.safetensors nor "
                             "adapter_model.bin")
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint file at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path), official_config
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(state).__name__})")
    return dict(state), official_config


def _check_official_config(official: dict, hp: dict) -> None:
    rank, alpha = official.get("r"), official.get("lora_alpha")
    if rank is not None and rank != hp["rank"]:
        raise ValueError(f"the checkpoint's adapter_config.json has r={rank} but cfg has "
                         f"rank={hp['rank']}")
    if alpha is not None and not math.isclose(float(alpha), float(hp["alpha"]), rel_tol=1e-9):
        raise ValueError(f"the checkpoint was trained with lora_alpha={alpha} but cfg has "
                         f"alpha={hp['alpha']}: pass AdapterConfig(alpha={alpha}, …) so that "
                         "the scaling alpha/r matches")


def _parse(state: dict):
    """({module name: {"A", "B", "R": tensor}}, ignored keys)."""
    entries: dict = {}
    ignored = []
    for key, value in state.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        for suffix, role in _SUFFIXES:
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                if not isinstance(value, Tensor):
                    raise ValueError(f"checkpoint entry {key!r} is not a tensor")
                if role in entries.setdefault(module, {}):
                    raise ValueError(f"the checkpoint holds two {role} tensors for {module!r}")
                entries[module][role] = value
                break
        else:
            ignored.append(key)
    for module, roles in entries.items():
        if "R" not in roles:
            raise ValueError(f"the checkpoint has {sorted(roles)} for {module!r} but no R "
                             "(…_lora_latent_mapping.weight): not a LoRA-XS checkpoint")
        if ("A" in roles) != ("B" in roles):
            raise ValueError(f"the checkpoint has {sorted(roles)} for {module!r}: A and B come "
                             "together or not at all")
    return entries, ignored


def _check_layers(layers, hp: dict) -> None:
    for name, layer in layers.items():
        if not isinstance(layer, LoRAXSLinear):
            raise ValueError(f"layer {name!r} is {type(layer).__name__}; official LoRA-XS "
                             "checkpoints load into LoRA-XS layers only")
        if layer.merged:
            raise ValueError(f"layer {name!r} is merged; call svk.unmerge(model) before loading")
        if layer.rank != hp["rank"]:
            raise ValueError(f"layer {name!r} has rank {layer.rank} but cfg has {hp['rank']}")
        if not math.isclose(layer.scaling, hp["alpha"] / hp["rank"], rel_tol=1e-9):
            raise ValueError(f"layer {name!r} has scaling {layer.scaling} but cfg gives "
                             f"alpha/r = {hp['alpha'] / hp['rank']}")


# ---- one layer ------------------------------------------------------------------------------

def _plan_layer(name, layer, roles, *, factors, sign_rule, tol):
    """The tensors to copy into ``layer`` and its LayerLoad; raises before anything is copied."""
    r, device = layer.rank, layer.weight.device
    R = _as64(roles["R"], device)
    _check_shape(name, "R (latent mapping)", R, (r, r))
    a, s, b = (_as64(getattr(layer, n), device) for n in ("a", "s", "b"))
    if "A" not in roles:
        if sign_rule is None:
            raise ValueError(f"{name}: the checkpoint holds R but not A and B: pass "
                             "recompute=True (rebuild them with scikit-learn as the official "
                             "code did) or sign_rule='right' (svk's factors with scikit-learn "
                             "0.24's signs, pinned by the official requirements.txt) or 'left'")
        signs = _rule_signs(a, b, sign_rule)
        core = signs[:, None] * R * signs[None, :]
        return {"core": core}, LayerLoad("svk", int((signs < 0).sum()), None, None)

    A, B = _as64(roles["A"], device), _as64(roles["B"], device)
    _check_shape(name, "A (lora_A)", A, (r, layer.in_features))
    _check_shape(name, "B (lora_B)", B, (layer.out_features, r))
    # The official A is Bᵀ·W for the weight it was trained on: a fingerprint of the base.
    weight = layer.original_weight().to(torch.float64)
    base_tol = max(tol, 4 * torch.finfo(roles["A"].dtype).eps)
    base_error = _relative(A - B.t() @ weight, A)
    if base_error > base_tol:
        raise ValueError(f"{name}: the checkpoint's A is not Bᵀ·W for this layer's weight "
                         f"(relative error {base_error:.2e} > {base_tol:.1e}): it was trained on "
                         "a different base model")
    if bool((s <= 0).any()):
        raise ValueError(f"{name}: svk's singular values include zeros (a rank-deficient "
                         "weight); the factors cannot hold the official update")
    P = b.t() @ B                          # (r, r): D when the factors agree up to signs
    Q = A @ a.t()                          # (r, r): diag(S)·D likewise
    left_error, right_error = _relative(B - b @ P, B), _relative(A - Q @ a, A)
    flipped = int((torch.diagonal(P) < 0).sum())
    if factors == "official":
        norms = A.norm(dim=1)
        if bool((norms == 0).any()):
            raise ValueError(f"{name}: a row of the checkpoint's A is zero")
        # b·core·diag(s)·a = B·R·diag(norms/s)·diag(s)·(A/norms) = B·R·A
        return ({"a": A / norms[:, None], "b": B, "core": R * (norms / s)[None, :]},
                LayerLoad("official", flipped, left_error, right_error))
    if max(left_error, right_error) > tol:
        raise ValueError(f"{name}: the checkpoint's factors span other subspaces than svk's "
                         f"top-{r} SVD (B off by {left_error:.2e}, A by {right_error:.2e}, "
                         f"tol {tol:g}): the official randomized SVD's inaccuracy, the official "
                         "retain_part='bottom', or singular values nearly equal at position r. "
                         "Use factors='official' to load the checkpoint's own A and B")
    core = P @ R @ Q / s[None, :]
    return {"core": core}, LayerLoad("svk", flipped, left_error, right_error)


def official_factors(weight: Tensor, rank: int, *, n_iter: int = 10,
                     random_state: int = 42) -> tuple[Tensor, Tensor]:
    """(A (r, in), B (out, r)) as the official code builds them from W (out, in) with
    scikit-learn (``utils/svd_utils.py``): TruncatedSVD(r, n_iter, random_state) fitted on
    X = Wᵀ (fp32), B = components_ᵀ, A = (X·components_ᵀ)ᵀ = Bᵀ·W. Uses
    ``sklearn.utils.extmath.randomized_svd`` with its sign flip, which is what scikit-learn
    0.24's TruncatedSVD ran (newer TruncatedSVD flips on the other side)."""
    try:
        from sklearn.utils.extmath import randomized_svd
    except ImportError as error:
        raise ImportError("recompute=True needs scikit-learn (pip install scikit-learn)") \
            from error
    X = weight.detach().float().t().contiguous().cpu()
    _, _, VT = randomized_svd(X.numpy(), rank, n_iter=n_iter, random_state=random_state)
    B = torch.from_numpy(VT).t().contiguous()
    return (X @ B).t().contiguous(), B


def _rule_signs(a: Tensor, b: Tensor, rule: str) -> Tensor:
    """D with official = svk·D, for an official SVD whose right ("right") or left ("left")
    singular vectors have their largest-magnitude entry positive (first one on ties, as
    numpy's argmax in svd_flip)."""
    vectors = a if rule == "right" else b.t()           # (r, n): one singular vector a row
    index = vectors.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(vectors.gather(1, index)).reshape(-1)
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def _as64(t: Tensor, device) -> Tensor:
    return t.detach().to(device=device, dtype=torch.float64)


def _relative(difference: Tensor, reference: Tensor) -> float:
    return float(difference.norm() / reference.norm().clamp_min(torch.finfo(torch.float64).tiny))


def _check_shape(name, what, t, shape):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: {what} has shape {tuple(t.shape)} in the checkpoint but "
                         f"this layer needs {tuple(shape)}")
