"""Adapter files (svk.integrations.adapter_io): what a file holds whatever requires_grad says,
the base-weight fingerprint and its dtype-aware tolerance, the dtype rule, bad files, save I/O
errors, atomic writes, file modes, modules_to_save, format 1, and FSDP2 (gloo, 2 processes).

Each test names the issue item it guards (issue 14 items 2, 8, 9, 19, 20, 21 and the note on
file modes; issue 15 items 4 and 8)."""
import datetime
import json
import os
import socket
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from svk.integrations import (AdapterConfig, adapted_layers, inject, load_adapter, read_adapter,
                              save_adapter)
from svk.integrations import adapter_io
from svk.nn import METHODS

METHOD_NAMES = sorted(METHODS)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 24)
        self.mid = nn.Linear(24, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.up(x)))))


def _cfg(method, **extra):
    hp = {"lora_xs": {"rank": 4}, "kasa": {"rank": 4}, "lora": {"rank": 4},
          "pissa": {"rank": 4}, "sara": {"tau": 0.05}, "mosara": {"heads": 2},
          "siva": {}}[method]
    return AdapterConfig(method=method, target_modules=["up", "mid"], **hp, **extra)


def _base(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Net().to(dtype)


def _model(method, seed=0, dtype=torch.float32, **extra):
    model = _base(seed, dtype)
    inject(model, _cfg(method, **extra), progress=False)
    return model


def _train(model, seed=2):
    """Changes every tensor the method trains (a stand-in for training)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            for name in type(layer).TRAINABLE:
                tensor = getattr(layer, name)
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator).to(tensor.dtype))


def _x():
    return torch.randn(5, 16, generator=torch.Generator().manual_seed(3))


def _adapter_state(model):
    return {f"{name}.{t}": v.detach().clone() for name, layer in adapted_layers(model).items()
            for t, v in layer.adapter_tensors().items()}


def _contents(path):
    with safe_open(os.fspath(path), framework="pt") as handle:
        return handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}


def _rewrite(src, dst, *, tensors=None, metadata=None, drop_meta=(), drop_tensors=()):
    meta, values = _contents(src)
    meta.update(metadata or {})
    values.update(tensors or {})
    for key in drop_meta:
        del meta[key]
    for key in drop_tensors:
        del values[key]
    save_file(values, os.fspath(dst), metadata=meta)
    return dst


def _unchanged(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---- 14.2: what is saved follows the method, not requires_grad ------------------------------
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_round_trip_after_requires_grad_false(method, tmp_path):
    """Fails on the old code: after model.requires_grad_(False) the LoRA-XS file held no core,
    LoRA's a/b were dropped, SARA/KaSA/SiVA's s and Mo-SARA's out_scale became "checks"."""
    model = _model(method)
    _train(model)
    model.requires_grad_(False)              # the usual step before export
    path = tmp_path / "frozen.safetensors"
    save_adapter(model, path)
    fresh = _model(method)
    load_adapter(fresh, path)
    expected, got = _adapter_state(model), _adapter_state(fresh)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    with torch.no_grad():
        assert torch.equal(fresh(_x()), model(_x()))


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_roles_are_the_methods_and_freezing_changes_nothing(method, tmp_path):
    model = _model(method)
    _train(model)
    save_adapter(model, tmp_path / "a.safetensors")
    model.requires_grad_(False)
    save_adapter(model, tmp_path / "b.safetensors")
    meta_a, tensors_a = _contents(tmp_path / "a.safetensors")
    meta_b, tensors_b = _contents(tmp_path / "b.safetensors")
    assert meta_a == meta_b
    assert tensors_a.keys() == tensors_b.keys()
    assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
    trains = set(METHODS[method].TRAINABLE)
    for layer in json.loads(meta_a["layers"]).values():
        roles = layer["tensors"]
        assert {t for t, role in roles.items() if role == "trainable"} == trains
        assert all(role == "check" for t, role in roles.items() if t not in trains)


def test_lora_xs_keeps_s_as_a_check_for_the_bank(tmp_path):
    """AdapterBank reads s as the base's singular values: it stays a "check", never loaded."""
    model = _model("lora_xs")
    save_adapter(model, tmp_path / "a.safetensors")
    file = read_adapter(tmp_path / "a.safetensors")
    assert all(meta["tensors"] == {"core": "trainable", "s": "check"}
               for meta in file.layers.values())
    assert file.format_version == "2" and file.fingerprint["probes"] == adapter_io.PROBES


def test_tensor_unfrozen_by_hand_is_kept(tmp_path):
    """requires_grad only adds: a LoRA-XS s trained by hand is stored and loaded, not checked."""
    model = _model("lora_xs")
    layer = adapted_layers(model)["up"]
    layer.s.requires_grad_(True)
    with torch.no_grad():
        layer.s.mul_(1.5)
    save_adapter(model, tmp_path / "a.safetensors")
    fresh = _model("lora_xs")
    load_adapter(fresh, tmp_path / "a.safetensors")
    assert torch.equal(adapted_layers(fresh)["up"].s, layer.s)


# ---- 14.8: a fingerprint of the original base weight, every method --------------------------
def _nudged_base(seed=0, relative=1e-3):
    """The same architecture with every weight changed by ~1e-3 relative: small enough that the
    adaptive methods pick the same ranks, far beyond any rounding."""
    model = _base(seed)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in (model.up, model.mid):
            module.weight.add_(relative * module.weight.abs().mean()
                               * torch.randn(module.weight.shape, generator=generator))
    return model


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_adapter_from_another_base_is_refused(method, tmp_path):
    """Fails on the old code for every method but LoRA-XS (those files loaded silently)."""
    model = _model(method)
    _train(model)
    save_adapter(model, tmp_path / "a.safetensors")
    other = _nudged_base()
    inject(other, _cfg(method), progress=False)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="trained on different base weights"):
        load_adapter(other, tmp_path / "a.safetensors")
    assert _unchanged(other, state)


@pytest.mark.parametrize("method", ["kasa", "pissa"])
def test_fingerprint_is_of_the_original_weight(method, tmp_path):
    """KaSA and PiSSA rewrite the base: the fingerprint is the weight's before the rewrite."""
    plain = _base()
    model = _model(method)
    for name, layer in adapted_layers(model).items():
        before, norm_before = adapter_io.sketch(getattr(plain, name).weight)
        ours, norm = adapter_io._layer_sketch(layer)
        via_layer, _ = adapter_io.sketch(layer.original_weight())
        # float64 sketches of weights that agree to fp32 rounding of the rewrite (≤ a few u·‖W‖)
        tolerance = 8 * 2.0 ** -24 * adapter_io.PROBES * norm_before
        assert float(torch.linalg.norm(ours - before)) <= tolerance
        assert float(torch.linalg.norm(via_layer - before)) <= tolerance
        assert norm == pytest.approx(norm_before, rel=1e-6)
        rewritten, _ = adapter_io.sketch(layer.weight)
        assert float(torch.linalg.norm(rewritten - before)) > 100 * tolerance


def test_probes_are_fixed_and_balanced():
    """The probes come from integer hashing (no RNG): pinned values, ±1, near-orthogonal."""
    p = adapter_io._probe(4096, 0)
    assert set(p.unique().tolist()) == {-1.0, 1.0}
    gram = p.t() @ p / 4096
    # independent ±1 columns: off-diagonal entries ~ N(0, 1/4096), |·| < 6σ ≈ 0.09
    assert torch.allclose(gram, torch.eye(adapter_io.PROBES, dtype=torch.float64), atol=0.09)
    assert not torch.equal(adapter_io._probe(64, 0), adapter_io._probe(64, 1))
    assert adapter_io._probe(3, 1).flatten().tolist()[:8] == PINNED_PROBE


# The first row of _probe(3, 1), as format 2 defines it: files written by any svk must keep
# verifying, so the probes may never change silently.
PINNED_PROBE = [1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]


def test_probe_hash_matches_a_plain_python_reference():
    def lowbias32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    p = adapter_io._probe(5, 1)
    for row in range(5):
        for col in range(adapter_io.PROBES):
            x = lowbias32((((row * adapter_io.PROBES + col) * 2 + 1) ^ 0x5BD1E995) & 0xFFFFFFFF)
            assert p[row, col] == 1.0 - 2.0 * (x >> 31)


# ---- 14.20: the same base in another dtype loads ------------------------------------------
@pytest.mark.parametrize("method", ["lora_xs", "pissa", "kasa", "sara"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_same_base_in_another_dtype_loads(method, dtype, tmp_path):
    """Fails on the old code for LoRA-XS in bf16 ("different base": its s check allowed 1e-4
    relative, less than bf16 rounding)."""
    fp32 = _model(method)
    _train(fp32)
    save_adapter(fp32, tmp_path / "fp32.safetensors")
    low = _base().to(dtype)
    inject(low, _cfg(method), progress=False)
    load_adapter(low, tmp_path / "fp32.safetensors")
    for key, value in _adapter_state(fp32).items():
        if key.rsplit(".", 1)[1] in METHODS[method].TRAINABLE:
            assert torch.equal(_adapter_state(low)[key], value.to(_adapter_state(low)[key].dtype))
    save_adapter(low, tmp_path / "low.safetensors")
    back = _model(method)
    load_adapter(back, tmp_path / "low.safetensors")


def test_other_base_in_another_dtype_names_the_dtypes(tmp_path):
    model = _model("lora")
    save_adapter(model, tmp_path / "a.safetensors")
    other = _base(seed=5).to(torch.bfloat16)
    inject(other, _cfg("lora"), progress=False)
    with pytest.raises(ValueError, match="bfloat16.*not a dtype difference alone"):
        load_adapter(other, tmp_path / "a.safetensors")


# ---- 14.9: dtypes and roles ------------------------------------------------------------------
@pytest.fixture
def lora_xs_file(tmp_path):
    model = _model("lora_xs")
    _train(model)
    path = tmp_path / "a.safetensors"
    save_adapter(model, path)
    return path


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_non_floating_tensor_is_refused(dtype, lora_xs_file, tmp_path):
    """Fails on the old code: int32/bool cores were cast silently."""
    core = _contents(lora_xs_file)[1]["up.core"]
    bad = _rewrite(lora_xs_file, tmp_path / "bad.safetensors",
                   tensors={"up.core": (core * 1e5).to(dtype)})
    model = _model("lora_xs")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"bad\.safetensors.*up\.core has dtype"):
        load_adapter(model, bad)
    assert _unchanged(model, state)


def test_float64_is_cast_only_when_exact(lora_xs_file, tmp_path):
    core = _contents(lora_xs_file)[1]["up.core"]
    exact = _rewrite(lora_xs_file, tmp_path / "exact.safetensors",
                     tensors={"up.core": core.double()})
    model = _model("lora_xs")
    load_adapter(model, exact)
    assert torch.equal(adapted_layers(model)["up"].core, core)
    inexact = _rewrite(lora_xs_file, tmp_path / "inexact.safetensors",
                       tensors={"up.core": core.double() + 1e-12})
    with pytest.raises(ValueError, match="float64 in the file but torch.float32 in the model"):
        load_adapter(_model("lora_xs"), inexact)


def test_half_precision_file_widens_exactly(lora_xs_file, tmp_path):
    core = _contents(lora_xs_file)[1]["up.core"].to(torch.bfloat16)
    path = _rewrite(lora_xs_file, tmp_path / "bf16.safetensors", tensors={"up.core": core})
    model = _model("lora_xs")
    load_adapter(model, path)
    assert torch.equal(adapted_layers(model)["up"].core, core.float())


def test_nan_is_refused(lora_xs_file, tmp_path):
    core = _contents(lora_xs_file)[1]["up.core"].clone()
    core[0, 0] = float("nan")
    path = _rewrite(lora_xs_file, tmp_path / "nan.safetensors", tensors={"up.core": core})
    with pytest.raises(ValueError, match="NaN or Inf"):
        load_adapter(_model("lora_xs"), path)


def test_unknown_role_is_refused(lora_xs_file, tmp_path):
    """Fails on the old code: any role but "check" was loaded."""
    meta = _contents(lora_xs_file)[0]
    layers = json.loads(meta["layers"])
    layers["up"]["tensors"]["core"] = "bias_correction"
    path = _rewrite(lora_xs_file, tmp_path / "role.safetensors",
                    metadata={"layers": json.dumps(layers)})
    with pytest.raises(ValueError, match="unknown role 'bias_correction'"):
        read_adapter(path)


def test_trained_tensor_stored_as_a_check_is_refused(lora_xs_file, tmp_path):
    layers = json.loads(_contents(lora_xs_file)[0]["layers"])
    layers["up"]["tensors"]["core"] = "check"
    path = _rewrite(lora_xs_file, tmp_path / "c.safetensors",
                    metadata={"layers": json.dumps(layers)})
    with pytest.raises(ValueError, match=r"lora_xs trains \['core'\]"):
        load_adapter(_model("lora_xs"), path)


# ---- 14.19: bad files ------------------------------------------------------------------------
def _layers_edit(edit):
    def apply(meta):
        layers = json.loads(meta["layers"])
        edit(layers["up"])
        return {"layers": json.dumps(layers)}
    return apply


BAD_METADATA = {
    "rank as a string": (_layers_edit(lambda m: m.update(rank="4")), "rank must be a positive"),
    "scaling as a string": (_layers_edit(lambda m: m.update(scaling="1.0")), "scaling must be"),
    "no rank": (_layers_edit(lambda m: m.pop("rank")), r"lacks \['rank'\]"),
    "no base": (_layers_edit(lambda m: m.pop("base")), r"lacks \['base'\]"),
    "bad base dtype": (_layers_edit(lambda m: m["base"].update(dtype="int8")), "base must be"),
    "malformed layers": (lambda meta: {"layers": meta["layers"][:-3]}, "'layers' is not valid JSON"),
    "malformed config": (lambda meta: {"config": "{"}, "'config' is not valid JSON"),
    "unknown method": (lambda meta: {"method": "dora"}, "unknown method 'dora'"),
    "newer version": (lambda meta: {"format_version": "3"}, "format version '3'"),
    "not svk": (lambda meta: {"format": "peft"}, "not an svk adapter file"),
    "bad fingerprint": (lambda meta: {"fingerprint": '{"kind": "sha1"}'}, "unknown base fingerp"),
    "bad modules": (lambda meta: {"modules": '{"head": {"weight": "trainable"}}'},
                    "'modules' must map"),
}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_bad_metadata_is_a_value_error_naming_the_file(case, lora_xs_file, tmp_path):
    """Fails on the old code (KeyError, JSONDecodeError, "rank 4 … but 4", or silence)."""
    edit, message = BAD_METADATA[case]
    path = _rewrite(lora_xs_file, tmp_path / "bad.safetensors",
                    metadata=edit(_contents(lora_xs_file)[0]))
    with pytest.raises(ValueError, match=message) as error:
        load_adapter(_model("lora_xs"), path)
    assert "bad.safetensors" in str(error.value)


@pytest.mark.parametrize("key", ["method", "layers", "config", "fingerprint", "modules"])
def test_missing_metadata_key(key, lora_xs_file, tmp_path):
    path = _rewrite(lora_xs_file, tmp_path / "bad.safetensors", drop_meta=[key])
    with pytest.raises(ValueError, match=rf"bad\.safetensors.*metadata keys \['{key}'\]"):
        read_adapter(path)


def test_missing_and_unlisted_tensors(lora_xs_file, tmp_path):
    missing = _rewrite(lora_xs_file, tmp_path / "m.safetensors", drop_tensors=["up.core"])
    with pytest.raises(ValueError, match=r"does not hold: \['up.core'\]"):
        read_adapter(missing)
    extra = _rewrite(lora_xs_file, tmp_path / "e.safetensors",
                     tensors={"up.extra": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"does not list: \['up.extra'\]"):
        read_adapter(extra)


@pytest.mark.parametrize("content", ["empty", "garbage", "truncated", "plain safetensors"])
def test_unreadable_files(content, lora_xs_file, tmp_path):
    """Fails on the old code: SafetensorError without the path."""
    path = tmp_path / "bad.safetensors"
    data = lora_xs_file.read_bytes()
    if content == "plain safetensors":
        save_file({"x": torch.zeros(2)}, os.fspath(path))
    else:
        path.write_bytes({"empty": b"", "garbage": b"\x07not a safetensors file at all",
                          "truncated": data[:len(data) - 10]}[content])
    with pytest.raises(ValueError, match="bad.safetensors"):
        read_adapter(path)


def test_directory_and_missing_path(tmp_path):
    """Fails on the old code: a directory gave "OSError: No such device"."""
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        read_adapter(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        read_adapter(tmp_path / "nowhere.safetensors")


# ---- 14.21 and file modes: saving ------------------------------------------------------------
def test_save_io_errors_name_the_users_path(tmp_path):
    """Fails on the old code: SafetensorError naming safetensors' temporary file."""
    model = _model("lora_xs")
    target = tmp_path / "missing_dir" / "a.safetensors"
    with pytest.raises(OSError, match="missing_dir/a.safetensors") as error:
        save_adapter(model, target)
    assert error.value.filename == os.fspath(target)
    with pytest.raises(IsADirectoryError):
        save_adapter(model, tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="file/a.safetensors"):
        save_adapter(model, tmp_path / "file" / "a.safetensors")


def test_failed_save_leaves_the_old_file_and_no_temporaries(tmp_path, monkeypatch):
    from safetensors import SafetensorError
    import safetensors.torch

    model = _model("lora_xs")
    path = tmp_path / "a.safetensors"
    save_adapter(model, path)
    before = path.read_bytes()

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:          # half a file, then the disk is full
            handle.write(b"partial")
        raise SafetensorError(f"Error while serializing: I/O error: No space left on device "
                              f"(os error 28) at path \"{filename}\"")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    _train(model)
    with pytest.raises(OSError, match="No space left.*a.safetensors") as error:
        save_adapter(model, path)
    assert ".tmp" not in str(error.value) and error.value.errno == 28
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_file_mode_follows_the_umask(umask, tmp_path):
    """Fails on the old code for umask 022/002: safetensors writes 0600 whatever the umask."""
    model = _model("lora_xs")
    old = os.umask(umask)
    try:
        save_adapter(model, tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.safetensors").st_mode) == 0o666 & ~umask


def test_overwriting_keeps_the_existing_mode(tmp_path):
    model = _model("lora_xs")
    path = tmp_path / "a.safetensors"
    save_adapter(model, path)
    os.chmod(path, 0o640)
    save_adapter(model, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


# ---- 15.4: modules_to_save -------------------------------------------------------------------
def _with_head(method="lora", seed=0):
    model = _model(method, seed=seed, modules_to_save=["head"])
    model.head.requires_grad_(True)          # what inject's modules_to_save support will do
    return model


def test_modules_to_save_round_trip(tmp_path):
    """Fails on the old code: the head was not in the file and load left it untouched."""
    model = _with_head()
    _train(model)
    with torch.no_grad():
        model.head.weight.mul_(-2.0)
        model.head.bias.add_(1.0)
    model.requires_grad_(False)
    save_adapter(model, tmp_path / "a.safetensors")
    file = read_adapter(tmp_path / "a.safetensors")
    assert file.modules == {"head": {"weight": "module", "bias": "module"}}
    assert torch.equal(file.tensors["head.weight"], model.head.weight)
    fresh = _with_head()
    load_adapter(fresh, tmp_path / "a.safetensors")
    assert torch.equal(fresh.head.weight, model.head.weight)
    assert torch.equal(fresh.head.bias, model.head.bias)
    with torch.no_grad():
        assert torch.equal(fresh(_x()), model(_x()))


def test_modules_to_save_refusals(tmp_path):
    model = _with_head()
    save_adapter(model, tmp_path / "a.safetensors")
    # a head of another shape: refused before anything changes
    other = _with_head()
    other.head = nn.Linear(24, 5)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"head\.bias: shape \(3,\) in the file but \(5,\)"):
        load_adapter(other, tmp_path / "a.safetensors")
    assert _unchanged(other, state)
    # the model expects a head the file does not hold
    plain = _model("lora")
    save_adapter(plain, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match=r"modules_to_save lists \['head'\]"):
        load_adapter(_with_head(), tmp_path / "plain.safetensors")
    # a typo in modules_to_save (inject refuses it too; here set after inject) never saves
    # nothing silently
    typo = _model("lora")
    typo._svk_config.modules_to_save = ["haed"]
    with pytest.raises(ValueError, match=r"\['haed'\] match no module"):
        save_adapter(typo, tmp_path / "typo.safetensors")
    assert not (tmp_path / "typo.safetensors").exists()


# ---- format 1 ---------------------------------------------------------------------------------
def _as_format_1(path, dst, roles=None):
    """The file an svk writing format 1 would have written for the same model."""
    meta, values = _contents(path)
    layers = json.loads(meta["layers"])
    for name, layer in layers.items():
        del layer["base"]
        if roles:
            layer["tensors"].update(roles)
        del values[f"{name}.base_fingerprint"]
    meta.update(format_version="1", layers=json.dumps(layers))
    del meta["fingerprint"], meta["modules"]
    save_file(values, os.fspath(dst), metadata=meta)
    return dst


def test_format_1_files_still_load(tmp_path):
    model = _model("lora_xs")
    _train(model)
    save_adapter(model, tmp_path / "a.safetensors")
    old = _as_format_1(tmp_path / "a.safetensors", tmp_path / "v1.safetensors")
    fresh = _model("lora_xs")
    with pytest.warns(UserWarning, match="format-1 adapter file"):
        load_adapter(fresh, old)
    assert read_adapter(old).format_version == "1"
    assert torch.equal(adapted_layers(fresh)["up"].core, adapted_layers(model)["up"].core)


def test_format_1_file_saved_frozen_loads_its_trained_s(tmp_path):
    """A format-1 SARA file written after requires_grad_(False) stored the trained s as a
    "check": the value is the trained one, so it is loaded."""
    model = _model("sara")
    _train(model)
    model.requires_grad_(False)
    save_adapter(model, tmp_path / "a.safetensors")
    old = _as_format_1(tmp_path / "a.safetensors", tmp_path / "v1.safetensors",
                       roles={"s": "check"})
    fresh = _model("sara")
    with pytest.warns(UserWarning):
        load_adapter(fresh, old)
    assert torch.equal(adapted_layers(fresh)["mid"].s, adapted_layers(model)["mid"].s)


# ---- 15.8: FSDP2 ----------------------------------------------------------------------------
WORLD, BATCH = 2, 8


def _fsdp_data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 16, generator=generator), torch.randint(0, 3, (BATCH,),
                                                                      generator=generator)


def _step(model, x, y):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def _fsdp_worker(rank, port, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (WORLD,))
    model = _with_head("kasa")
    for name in ("up", "mid", "head"):
        fully_shard(getattr(model, name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    x, y = _fsdp_data()
    share = BATCH // WORLD
    _step(model, x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
    save_adapter(model, f"{out_dir}/fsdp.safetensors")          # every rank; rank 0 writes
    # and back into a fresh sharded model: every rank loads its own shards
    fresh = _with_head("kasa")
    for name in ("up", "mid", "head"):
        fully_shard(getattr(fresh, name), mesh=mesh)
    fully_shard(fresh, mesh=mesh)
    load_adapter(fresh, f"{out_dir}/fsdp.safetensors")
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in fresh.state_dict().items()}
    trained = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
               for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save({"loaded": full, "trained": trained}, f"{out_dir}/states.pt")
    dist.barrier()
    # Leave without tearing gloo down (see tests/test_ddp.py: teardown can hang).
    os._exit(0)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fsdp2_save_matches_single_process(tmp_path):
    """Fails on the old code: "Attempted to access the data pointer on an invalid python
    storage" (DTensor shards handed to safetensors)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.start_processes(_fsdp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD,
                       join=True, start_method="spawn")
    reference = _with_head("kasa")
    _step(reference, *_fsdp_data())
    save_adapter(reference, tmp_path / "single.safetensors")
    meta_fsdp, fsdp = _contents(tmp_path / "fsdp.safetensors")
    meta_single, single = _contents(tmp_path / "single.safetensors")
    assert meta_fsdp == meta_single       # fingerprints and norms of gathered bases: bitwise
    assert fsdp.keys() == single.keys()
    for key in single:
        if key.endswith("base_fingerprint"):
            assert torch.equal(fsdp[key], single[key]), key
        else:
            # gradients summed over 2 ranks in another order than one process: fp32 rounding
            # of a few additions, amplified by one lr=0.5 step (as in tests/test_ddp.py)
            torch.testing.assert_close(fsdp[key], single[key], rtol=1e-5, atol=1e-6)
    assert not any(name.startswith(".") for name in os.listdir(tmp_path))   # no temporaries
    states = torch.load(tmp_path / "states.pt")
    for key, value in states["trained"].items():
        assert torch.equal(states["loaded"][key], value), key


def test_check_base_for_readers_with_their_own_layers(tmp_path):
    """adapter_io.check_base is what AdapterBank can call with its own (LoRA-XS) weights."""
    model = _model("lora_xs")
    save_adapter(model, tmp_path / "a.safetensors")
    file = read_adapter(tmp_path / "a.safetensors")
    adapter_io.check_base(file, "up", _base().up.weight)
    adapter_io.check_base(file, "up", _base().up.weight.to(torch.bfloat16))
    with pytest.raises(ValueError, match="layer 'up': the base weight differs"):
        adapter_io.check_base(file, "up", _nudged_base().up.weight)
