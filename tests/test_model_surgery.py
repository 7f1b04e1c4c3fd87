"""Model surgery as PEFT users expect it: "all-linear", modules_to_save, unload,
disable_adapter, tied weights, refusals that change nothing, aliases, merged-state markers,
hyperparameter checks (issues 14 and 15)."""
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from svk.integrations import (AdapterConfig, adapted_layers, disable_adapter, inject, merge,
                              print_trainable_parameters, unload, unmerge)
from svk.nn import METHODS, KaSALinear, LoRALinear
from svk.nn.base import SVLinear

os.environ.setdefault("HF_HUB_OFFLINE", "1")
METHOD_NAMES = sorted(METHODS)


def _llama(seed=0, cls_name="LlamaForCausalLM", **extra):
    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32,
                                      pad_token_id=0, **extra)
    return getattr(transformers, cls_name)(config).eval()


def _gpt2(seed=0, cls_name="GPT2LMHeadModel", **extra):
    import transformers
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=48, n_layer=2,
                                     n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra)
    return getattr(transformers, cls_name)(config).eval()


def _cfg(method, targets, **hp):
    defaults = {"lora_xs": {"rank": 4}, "kasa": {"rank": 4}, "lora": {"rank": 4},
                "pissa": {"rank": 4}, "sara": {"tau": 0.05}, "mosara": {"heads": 3}}
    return AdapterConfig(method=method, target_modules=targets, **{**defaults.get(method, {}),
                                                                  **hp})


def _ids(batch=2, length=7, seed=1):
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _perturb(model, scale=0.05, seed=2):
    """Stands in for training: moves every trainable tensor away from its initial value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator))


def _flags(model):
    return {name: p.requires_grad for name, p in model.named_parameters()}


class Net(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)


# ---- 15.3: "all-linear" --------------------------------------------------------------------
@pytest.mark.parametrize("build, task", [
    (lambda: _llama(), "CAUSAL_LM"),
    (lambda: _gpt2(), "CAUSAL_LM"),
    (lambda: _llama(cls_name="LlamaForSequenceClassification", num_labels=3), "SEQ_CLS"),
    (lambda: _gpt2(cls_name="GPT2ForSequenceClassification", num_labels=3), "SEQ_CLS")])
def test_all_linear_selects_what_peft_selects(build, task):
    """The same layers as PEFT 0.21's _maybe_include_all_linear_layers (before the fix the
    string was a regex matching nothing, and inject raised)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
    model = build()
    expected = _maybe_include_all_linear_layers(
        LoraConfig(target_modules="all-linear", task_type=task), model).target_modules
    summary = inject(model, _cfg("lora", "ALL-LINEAR"), progress=False)
    assert {row.name for row in summary.layers} == set(expected)
    assert not any(name.endswith(("lm_head", "score")) for name in adapted_layers(model))


def test_all_linear_leaves_out_a_classifier_subtree_and_modules_to_save():
    class Head(nn.Module):       # RoBERTa-like: the classifier is a module holding Linears
        def __init__(self):
            super().__init__()
            self.dense, self.out_proj = nn.Linear(16, 16), nn.Linear(16, 2)

    net = Net()
    net.classifier = Head()
    summary = inject(net, _cfg("lora", "all-linear", modules_to_save=["head"]), progress=False)
    assert [row.name for row in summary.layers] == ["blocks.0", "blocks.1"]
    assert net.head.weight.requires_grad and not net.classifier.dense.weight.requires_grad


def test_rank_too_large_names_the_layer_and_changes_nothing():
    net = Net(classes=3)
    before = _flags(net)
    with pytest.raises(ValueError, match=r"rank=4 is too large .*head \(3×16, rank ≤ 3\)"):
        inject(net, _cfg("lora_xs", r".*"), progress=False)
    with pytest.raises(ValueError, match=r"head \(3×16, rank ≤ 2\).*KaSA keeps"):
        inject(net, _cfg("kasa", r".*", rank=3), progress=False)
    assert _flags(net) == before and not adapted_layers(net)
    assert all(before.values())
    # LoRA's random factors take any rank (as in PEFT)
    inject(net, _cfg("lora", r".*", rank=8), progress=False)
    assert adapted_layers(net)["head"].rank == 8


def test_a_failure_while_building_restores_every_flag(monkeypatch):
    """Building shares and freezes nn.Linear weights; a failure half-way (here: the second
    shape group) must leave requires_grad as it was (before: everything frozen)."""
    net = Net()
    calls = []
    original = LoRALinear.init_factors.__func__

    def failing(cls, W, hp, *, generator=None):
        calls.append(W.shape)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return original(cls, W, hp, generator=generator)
    monkeypatch.setattr(LoRALinear, "init_factors", classmethod(failing))
    before = _flags(net)
    with pytest.raises(RuntimeError, match="boom"):
        inject(net, _cfg("lora", r".*"), progress=False)
    assert len(calls) == 2 and _flags(net) == before
    assert not any(isinstance(m, SVLinear) for m in net.modules())


# ---- 14.13: typos in target_modules ---------------------------------------------------------
def test_target_entries_that_match_nothing_raise():
    model = _llama()
    with pytest.raises(ValueError, match=r"\['q_prj'\] match no nn.Linear"):
        inject(model, _cfg("lora", ["q_proj", "q_prj"]), progress=False)
    with pytest.raises(ValueError, match=r"\['self_attn'\].*not nn.Linear or Conv1D"):
        inject(model, _cfg("lora", ["q_proj", "self_attn"]), progress=False)
    assert not adapted_layers(model)
    assert all(p.requires_grad for p in model.parameters())


# ---- 14.12: one module under two names; merged state into an unmerged model ----------------
def test_module_registered_twice_is_adapted_under_both_names():
    net = Net()
    net.alias = net.blocks[0]           # the same module object, a second name
    with pytest.warns(UserWarning, match="several names"):
        inject(net, _cfg("lora", ["blocks.0", "blocks.1"]), progress=False)
    assert isinstance(net.alias, SVLinear) and net.alias is net.blocks[0]
    assert list(adapted_layers(net)) == ["blocks.0", "blocks.1"]
    unload(net, merge=True)
    assert type(net.alias) is nn.Linear and net.alias is net.blocks[0]


def test_merged_state_into_unmerged_model_is_refused_and_changes_nothing():
    cfg = _cfg("lora", ["q_proj", "v_proj"])
    source, target = _llama(), _llama()
    inject(source, cfg, progress=False)
    inject(target, cfg, progress=False)
    _perturb(source)
    ids = _ids()
    with torch.no_grad():
        expected = source(ids).logits
    unmerged_state = {k: v.clone() for k, v in source.state_dict().items()}
    merge(source)
    merged_state = source.state_dict()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="merged model but the layer is unmerged.*twice"):
        target.load_state_dict(merged_state)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    # unmerged → unmerged and merged → merged both give the source's outputs
    target.load_state_dict(unmerged_state)
    with torch.no_grad():
        assert torch.equal(target(ids).logits, expected)
    merge(target)
    target.load_state_dict(merged_state)
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, expected, rtol=1e-5, atol=1e-5)
        unmerge(target)    # subtracts the loaded update (the exact copy belonged to the old one)
        torch.testing.assert_close(target(ids).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unmerged model but the layer is merged"):
        source.load_state_dict(unmerged_state)


def test_plain_state_dicts_load_into_injected_models_only_where_correct():
    """A plain base model's state (no svk markers, Conv1D layout) loads into layers that keep
    the base (GPT-2 Conv1D transposed on the way in) and is refused by KaSA/PiSSA layers."""
    ids = _ids()
    plain = _gpt2(seed=3)
    with torch.no_grad():
        expected = plain(ids).logits
    model = _gpt2(seed=0)
    inject(model, _cfg("lora", ["c_attn", "attn.c_proj"]), progress=False)
    model.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    kasa = _llama()
    inject(kasa, _cfg("kasa", ["q_proj"]), progress=False)
    with pytest.raises(ValueError, match="rewritten base"):
        kasa.load_state_dict(_llama(seed=4).state_dict(), strict=False)


# ---- 14.5 / 15.6: tied weights --------------------------------------------------------------
def test_tied_lm_head_is_refused_naming_the_tie_and_the_untie_recipe_merges_correctly():
    model = _gpt2()
    before = _flags(model)
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to \['transformer.wte.weight'\]"):
        inject(model, _cfg("lora", ["c_attn", "lm_head"]), progress=False)
    assert _flags(model) == before
    # the recipe the error gives
    model.get_submodule("lm_head").weight = nn.Parameter(
        model.get_submodule("lm_head").weight.detach().clone())
    model.config.tie_word_embeddings = False
    wte = model.transformer.wte.weight.detach().clone()
    inject(model, _cfg("lora", ["c_attn", "lm_head"]), progress=False)
    _perturb(model)
    ids = _ids()
    with torch.no_grad():
        unmerged = model(ids).logits
        merge(model)
        merged = model(ids).logits
    assert torch.equal(model.transformer.wte.weight, wte)
    # fp32: the merged GEMM rounds differently from base GEMM + rank-4 update (~1e-7 relative)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


# ---- 14.22: hyperparameters -----------------------------------------------------------------
@pytest.mark.parametrize("method, name, value", [
    ("lora", "alpha", math.inf), ("lora", "alpha", math.nan), ("kasa", "gamma", math.inf),
    ("kasa", "beta", math.inf), ("kasa", "beta", math.nan), ("sara", "tau", math.nan),
    ("siva", "perc", math.nan), ("lora_xs", "alpha", -math.inf)])
def test_non_finite_hyperparameters_are_refused(method, name, value):
    with pytest.raises(ValueError, match=f"{name} must be"):
        AdapterConfig(method=method, target_modules=["q"], **{name: value})
    with pytest.raises(ValueError, match=f"{name} must be"):
        METHODS[method].from_linear(nn.Linear(8, 8), **{name: value})


def test_numpy_scalars_are_accepted_alike_and_serialise():
    cfg = AdapterConfig(method="kasa", target_modules=["q"], rank=np.int64(2),
                        alpha=np.float32(8), beta=np.float64(1e-3), gamma=np.float32(1e-2))
    assert cfg.to_dict()["alpha"] == 8.0 and type(cfg.alpha) is float and type(cfg.rank) is int
    assert AdapterConfig.from_json(cfg.to_json()) == cfg
    layer = KaSALinear.from_linear(nn.Linear(8, 8), rank=np.int64(2), alpha=np.float32(8))
    assert layer.scaling == 4.0 and all(type(v) in (int, float) for v in layer.hparams.values())


@pytest.mark.parametrize("method", ["lora_xs", "pissa"])
def test_all_zero_weight_warns_that_the_adapter_cannot_train(method):
    net = Net()
    with torch.no_grad():
        net.blocks[1].weight.zero_()
    with pytest.warns(UserWarning, match=r"cannot train.*blocks\.1 \(4 of 4\)"):
        inject(net, _cfg(method, ["blocks.0", "blocks.1"]), progress=False)


# ---- 15.4: modules_to_save (inject side) ----------------------------------------------------
def test_modules_to_save_keep_training_and_bad_entries_raise():
    model = _llama(cls_name="LlamaForSequenceClassification", num_labels=3)
    with pytest.raises(ValueError, match=r"modules_to_save entries \['scroe'\]"):
        inject(model, _cfg("lora", ["q_proj"], modules_to_save=["scroe"]), progress=False)
    with pytest.raises(ValueError, match="both targeted and in modules_to_save"):
        inject(model, _cfg("lora", ["q_proj"], modules_to_save=["q_proj"]), progress=False)
    assert all(p.requires_grad for p in model.parameters())
    inject(model, _cfg("lora", ["q_proj", "v_proj"], modules_to_save=["score"]), progress=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {f"{name}.{t}" for name, layer in adapted_layers(model).items()
                for t in layer.trainable_names()}
    assert trainable == adapters | {"score.weight"}


# ---- 15.5: unload and disable_adapter -------------------------------------------------------
@pytest.mark.parametrize("arch, method", [("llama", "lora"), ("llama", "pissa"),
                                          ("llama", "kasa"), ("gpt2", "lora_xs"),
                                          ("gpt2", "pissa")])
def test_unload_merged_saves_and_loads_with_transformers(arch, method, tmp_path):
    build, targets = {"llama": (_llama, ["q_proj", "v_proj", "down_proj"]),
                      "gpt2": (_gpt2, ["c_attn", "mlp.c_proj"])}[arch]
    model = build()
    for p in model.parameters():
        p.requires_grad_(True)
    inject(model, _cfg(method, targets), progress=False)
    _perturb(model, scale=0.2)
    ids = _ids()
    with torch.no_grad():
        adapted = model(ids).logits
    plain = unload(model, merge=True)
    assert plain is model and not adapted_layers(model)
    kinds = {type(model.get_submodule(n)).__name__ for n, _ in model.named_modules()
             if n.endswith(tuple(targets))}
    assert kinds == ({"Linear"} if arch == "llama" else {"Conv1D"})
    assert all(p.requires_grad for p in model.parameters())     # the flags from before inject
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        reloaded = loaded(ids).logits
    # fp32 merge: one rounding of W + ΔW per weight element (≈ 6e-8 relative) and a GEMM that
    # rounds differently from base GEMM + low-rank path.
    torch.testing.assert_close(reloaded, adapted, rtol=1e-5, atol=1e-5)
    # weights loaded from one file are not taken for tied ones: inject accepts the loaded model
    assert inject(loaded, _cfg("lora", "all-linear"), progress=False).layers


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_unload_unmerged_and_disable_adapter_give_the_original_base(method):
    targets = ["q_proj", "v_proj", "down_proj"]
    base, model = _llama(), _llama()
    ids = _ids()
    with torch.no_grad():
        expected = base(ids).logits
    inject(model, _cfg(method, targets), progress=False)
    _perturb(model, scale=0.2)
    with torch.no_grad():
        adapted = model(ids).logits
        assert not torch.allclose(adapted, expected, rtol=1e-3, atol=1e-3)
        with disable_adapter(model):
            disabled = model(ids).logits
        after = model(ids).logits
    # KaSA/PiSSA rebuild W as residual + removed part in fp32: one rounding per element; the
    # other methods run F.linear on the untouched base weight, bit for bit.
    exact = method not in ("kasa", "pissa")
    tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(disabled, expected, **tolerance)
    assert torch.equal(after, adapted)
    with pytest.raises(ZeroDivisionError), disable_adapter(model):
        1 / 0
    assert not any(layer.adapter_disabled for layer in adapted_layers(model).values())

    if method != "mosara":
        merge(model)
        with torch.no_grad(), disable_adapter(model):
            torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    else:
        with pytest.raises(ValueError, match="Mo-SARA"):
            unload(model, merge=True)
        assert len(adapted_layers(model)) == 6
    unload(model, merge=False)
    assert not adapted_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, **tolerance)
    originals = dict(base.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, originals[name], **tolerance)


def test_mosara_unload_refuses_merging_and_gives_the_base_back():
    base, model = _llama(), _llama()
    ids = _ids()
    with torch.no_grad():
        expected = base(ids).logits
    inject(model, _cfg("mosara", ["q_proj", "v_proj"]), progress=False)
    _perturb(model, scale=0.2)
    with pytest.raises(ValueError, match="Mo-SARA"):
        unload(model, merge=True)
    assert len(adapted_layers(model)) == 4     # refused: nothing changed
    unload(model, merge=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)


# ---- 15.11: quiet inject, PEFT-like counts --------------------------------------------------
def test_inject_prints_nothing_and_print_trainable_parameters(capsys):
    model = _llama()
    summary = inject(model, _cfg("lora_xs", ["q_proj", "v_proj"]), progress=False)
    assert capsys.readouterr().out == ""
    count = print_trainable_parameters(model)
    line = capsys.readouterr().out.strip()
    assert line == (f"trainable params: {count.trainable:,d} || all params: {count.total:,d} "
                    f"|| trainable%: {100 * count.trainable / count.total:.4f}")
    assert count.trainable == 4 * 16 == summary.trainable
    print_trainable_parameters(model, per_layer=True)
    out = capsys.readouterr().out
    assert "model.layers.1.self_attn.v_proj" in out and summary.table().splitlines()[0] in out
