"""PEFT interop: svk.export_peft writes a PEFT LoRA checkpoint that PeftModel (and vLLM's
rules) load to the svk model's logits; svk.import_peft reads PEFT LoRA and KaSA checkpoints
into svk layers that compute PeftModel's logits and keep training.

Tolerance. Every comparison is of fp32 logits from the same weights computed in a different
order (PEFT: x·Aᵀ·Bᵀ with the scale folded into B; svk: ((x·aᵀ)⊙s)·coreᵀ·bᵀ·scaling, or a
truncated base plus the removed part for KaSA/PiSSA). Each differs by a few fp32 roundings
(2^-24 ≈ 6e-8) per product, accumulated over 2 layers of 64-wide sums; measured ≤ 1e-6
relative, so 1e-5 (the issue's bound) has a 10× margin and would still catch any wrong factor,
scale or sign (those move the logits by ≥ 1e-3 relative, checked by _assert_adapter_matters).
"""
import copy
import json
import math
import re

import pytest
import torch
from torch import nn

import svk
from svk.integrations import adapted_layers
from svk.integrations.peft_io import export_peft, import_peft, lora_factors

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

RTOL = 1e-5
IDS = torch.tensor([[3, 17, 99, 4, 56, 120, 7, 0], [1, 2, 64, 31, 8, 77, 100, 5]])
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
# Hyperparameters that give non-trivial ranks on the 64-wide models (SARA and SiVA pick a
# different rank per layer shape, which exercises rank_pattern/alpha_pattern).
HPARAMS = {"lora_xs": {"rank": 8}, "sara": {"tau": 0.3}, "kasa": {"rank": 4},
           "siva": {"perc": 0.9}, "lora": {"rank": 4}, "pissa": {"rank": 4}}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def rel_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def perturb(model, seed=1):
    """Random changes to every trainable tensor (many start at zero), sized to the tensor."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                size = max(param.abs().mean().item(), 0.05)
                param.add_(0.5 * size * torch.randn(param.shape, generator=generator))


def _assert_adapter_matters(adapted, base):
    # Otherwise a test comparing adapted logits could pass with the adapter dropped.
    assert rel_error(logits(adapted), logits(base)) > 1e-3


def injected(make, method, targets):
    model = make()
    base = copy.deepcopy(model)
    svk.inject(model, svk.AdapterConfig(method=method, target_modules=targets,
                                        **HPARAMS[method]))
    perturb(model)
    return model, base


def peft_model(base, directory):
    from peft import PeftModel
    return PeftModel.from_pretrained(base, str(directory)).eval()


# ---- export -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(HPARAMS))
def test_export_llama_reproduces_logits_in_peft(method, tmp_path):
    model, base = injected(tiny_llama, method, LLAMA_TARGETS)
    config = export_peft(model, tmp_path)
    ours = logits(model)
    _assert_adapter_matters(model, base)
    theirs = logits(peft_model(base, tmp_path))
    assert rel_error(theirs, ours) <= RTOL
    ranks = {name: layer.rank for name, layer in adapted_layers(model).items()}
    if method in ("kasa", "pissa"):        # the removed part of the base rides along
        assert config["r"] == 2 * max(ranks.values())
    else:
        assert config["r"] == max(ranks.values())
    if len(set(ranks.values())) > 1:
        assert config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]
    assert config["target_modules"] == sorted(LLAMA_TARGETS)


def test_export_has_per_layer_ranks_for_sara_and_siva(tmp_path):
    # Guards the test above: at least one adaptive method exercises rank_pattern.
    model, _ = injected(tiny_llama, "siva", LLAMA_TARGETS)
    assert export_peft(model, tmp_path)["rank_pattern"]


@pytest.mark.parametrize("method", ["lora_xs", "kasa", "sara", "pissa"])
def test_export_gpt2_conv1d_reproduces_logits_in_peft(method, tmp_path):
    model, base = injected(tiny_gpt2, method, GPT2_TARGETS)
    assert all(layer.from_conv1d for layer in adapted_layers(model).values())
    config = export_peft(model, tmp_path)
    assert config["fan_in_fan_out"] is True
    _assert_adapter_matters(model, base)
    theirs = logits(peft_model(base, tmp_path))
    assert rel_error(theirs, logits(model)) <= RTOL


def test_export_factors_equal_update_relative_to_original_base():
    # fp64 check of the factor algebra, per layer: original base + B·A = the layer's weight.
    model, _ = injected(tiny_llama, "kasa", ["q_proj"])
    for layer in adapted_layers(model).values():
        a, b = lora_factors(layer)
        effective = layer.weight.double() + layer.delta_weight().double()
        original = layer.original_weight().double()
        torch.testing.assert_close(original + b.double() @ a.double(), effective,
                                   rtol=0, atol=1e-6 * effective.abs().max().item())


def test_export_merged_model_gives_the_same_checkpoint(tmp_path):
    from safetensors.torch import load_file
    model, _ = injected(tiny_llama, "pissa", ["q_proj", "v_proj"])
    export_peft(model, tmp_path / "unmerged")
    svk.merge(model)
    export_peft(model, tmp_path / "merged")
    one = load_file(tmp_path / "unmerged" / "adapter_model.safetensors")
    two = load_file(tmp_path / "merged" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key])


def test_export_mosara_raises(tmp_path):
    model = tiny_llama()
    svk.inject(model, svk.AdapterConfig(method="mosara", target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="Mo-SARA.*token"):
        export_peft(model, tmp_path)
    assert not any(tmp_path.iterdir())       # nothing written


def test_export_without_layers_raises(tmp_path):
    with pytest.raises(ValueError, match="no svk adapter layers"):
        export_peft(tiny_llama(), tmp_path)


def test_export_target_modules_full_names_when_short_names_overreach(tmp_path):
    # Only layer 0's q_proj is adapted: "q_proj" would also select layer 1's in PEFT.
    model, base = injected(tiny_llama, "lora_xs", r"model\.layers\.0\.self_attn\.q_proj")
    config = export_peft(model, tmp_path)
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    theirs = peft_model(base, tmp_path)
    assert rel_error(logits(theirs), logits(model)) <= RTOL
    wrapped = [n for n, m in theirs.named_modules() if hasattr(m, "lora_A")]
    assert wrapped == ["base_model.model.model.layers.0.self_attn.q_proj"]


# ---- the checkpoint is a standard one (PEFT's config loader, vLLM's rules) -----------------

def _parse_vllm_key(key):
    """vLLM's parse_fine_tuned_lora_name (vllm/lora/utils.py): module name, is_lora_a."""
    parts = key.split(".")
    start = 2 if key.startswith("base_model.model.") else 0
    if parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[start:-2]), parts[-2] == "lora_A"
    raise ValueError(f"{key} is unsupported LoRA weight")


@pytest.mark.parametrize("make,method,targets", [(tiny_llama, "siva", LLAMA_TARGETS),
                                                 (tiny_gpt2, "kasa", GPT2_TARGETS)])
def test_export_is_a_standard_checkpoint_peft_and_vllm_read(make, method, targets, tmp_path):
    from dataclasses import fields

    from peft import LoraConfig
    from safetensors.torch import load_file

    model, base = injected(make, method, targets)
    export_peft(model, tmp_path, base_model_name_or_path="org/tiny")
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    # Only LoraConfig's own fields, and PEFT's loader accepts them.
    assert set(raw) <= {f.name for f in fields(LoraConfig)}
    loaded = LoraConfig.from_pretrained(str(tmp_path))
    assert loaded.peft_type.value == "LORA" and loaded.base_model_name_or_path == "org/tiny"
    assert loaded.r == raw["r"] and loaded.rank_pattern == raw["rank_pattern"]

    # vLLM's PEFTHelper (vllm/lora/peft_helper.py): required r, lora_alpha, target_modules;
    # refuses modules_to_save and DoRA; bias "none" unless bias_enabled; one scale
    # lora_alpha/r for every module (rank_pattern and alpha_pattern are ignored).
    for key in ("r", "lora_alpha", "target_modules"):
        assert key in raw
    assert not raw["modules_to_save"] and raw["use_dora"] is False and raw["bias"] == "none"
    assert raw["use_rslora"] is False and raw["lora_alpha"] / raw["r"] == 1.0
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    modules = {}
    for key, value in tensors.items():
        name, is_a = _parse_vllm_key(key)
        modules.setdefault(name, {})["A" if is_a else "B"] = value
    assert max(m["A"].shape[0] for m in modules.values()) == raw["r"]   # ≤ max_lora_rank

    # vLLM's computation: W + (lora_alpha / r)·B·A per module, ranks from the shapes alone.
    vllm_like = copy.deepcopy(base)
    named = dict(vllm_like.named_modules())
    scale = raw["lora_alpha"] / raw["r"]
    with torch.no_grad():
        for name, pair in modules.items():
            delta = scale * pair["B"] @ pair["A"]                   # (out, in)
            module = named[name]
            module.weight.add_(delta.t() if raw["fan_in_fan_out"] else delta)
    assert rel_error(logits(vllm_like), logits(model)) <= RTOL


def test_export_loads_with_auto_peft_model_from_its_config(tmp_path):
    # The user's path: base_model_name_or_path and task_type let PEFT find the base itself.
    from peft import AutoPeftModelForCausalLM
    model, base = injected(tiny_llama, "lora_xs", LLAMA_TARGETS)
    base.save_pretrained(str(tmp_path / "base"))
    export_peft(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"),
                task_type="CAUSAL_LM")
    theirs = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    assert rel_error(logits(theirs), logits(model)) <= RTOL


# ---- import -------------------------------------------------------------------------------

def _train_peft(base, config, seed=2):
    from peft import get_peft_model
    theirs = get_peft_model(base, config)
    perturb(theirs, seed)
    return theirs


@pytest.mark.parametrize("rslora", [False, True])
def test_import_peft_lora_llama(rslora, tmp_path):
    from peft import LoraConfig
    base = tiny_llama()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3},
                        use_rslora=rslora)
    _train_peft(copy.deepcopy(base), config).save_pretrained(str(tmp_path))
    theirs = peft_model(copy.deepcopy(base), tmp_path)

    ours = copy.deepcopy(base)
    summary = import_peft(ours, tmp_path)
    layers = adapted_layers(ours)
    assert len(layers) == 6 and summary.method == "lora"
    v = layers["model.layers.0.self_attn.v_proj"]
    down = layers["model.layers.1.mlp.down_proj"]
    assert v.rank == 2 and down.rank == 4
    assert math.isclose(down.scaling, 3 / (math.sqrt(4) if rslora else 4))
    _assert_adapter_matters(ours, base)
    assert rel_error(logits(ours), logits(theirs)) <= RTOL

    # Training continues on svk's path: a and b get gradients, nothing else does.
    ours.train()
    ours(IDS).logits.float().square().mean().backward()
    for layer in layers.values():
        assert layer.a.grad is not None and layer.a.grad.abs().max() > 0
        assert layer.b.grad is not None and layer.b.grad.abs().max() > 0
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        f"{name}.{t}" for name in layers for t in ("a", "b")}

    # An imported model is an ordinary svk model: its adapter file round-trips.
    svk.save_adapter(ours, tmp_path / "svk.safetensors")
    again = copy.deepcopy(base)
    import_peft(again, tmp_path)
    with torch.no_grad():
        for layer in adapted_layers(again).values():
            layer.b.zero_()
    svk.load_adapter(again, tmp_path / "svk.safetensors")
    ours.eval()
    assert rel_error(logits(again), logits(ours)) == 0.0


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_import_peft_lora_gpt2_conv1d(safe_serialization, tmp_path):
    from peft import LoraConfig
    base = tiny_gpt2()
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"],
                        fan_in_fan_out=True)
    _train_peft(copy.deepcopy(base), config).save_pretrained(
        str(tmp_path), safe_serialization=safe_serialization)   # False: adapter_model.bin
    theirs = peft_model(copy.deepcopy(base), tmp_path)
    ours = copy.deepcopy(base)
    import_peft(ours, tmp_path)
    assert all(layer.from_conv1d for layer in adapted_layers(ours).values())
    _assert_adapter_matters(ours, base)
    assert rel_error(logits(ours), logits(theirs)) <= RTOL


def test_import_peft_kasa(tmp_path):
    from peft import KasaConfig, LoraConfig
    base = tiny_llama()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                        kasa_config=KasaConfig(beta=2e-4, gamma=3e-3))
    trained = _train_peft(copy.deepcopy(base), config)
    trained.save_pretrained(str(tmp_path))
    theirs = peft_model(copy.deepcopy(base), tmp_path)   # truncates the fresh base on load
    ours = copy.deepcopy(base)
    summary = import_peft(ours, tmp_path)
    layers = adapted_layers(ours)
    assert summary.method == "kasa" and all(layer.method == "kasa" for layer in layers.values())
    assert layers["model.layers.0.self_attn.q_proj"].hparams["gamma"] == 3e-3
    _assert_adapter_matters(ours, base)
    assert rel_error(logits(ours), logits(theirs)) <= RTOL
    # The same regulariser as PEFT's (summed over layers, as PEFT sums it).
    torch.testing.assert_close(svk.regularization_loss(ours, reduction="sum"),
                               theirs.base_model._get_kasa_loss(), rtol=1e-5, atol=0)
    # And the original base is recoverable (the truncation's removed part is kept), to the
    # fp32 SVD's reconstruction error: a few ulps of ‖W‖ times √min(out, in) (measured 1e-6
    # of max|W|).
    for name, layer in layers.items():
        original = dict(base.named_modules())[name].weight
        torch.testing.assert_close(layer.original_weight(), original, rtol=0,
                                   atol=1e-5 * original.abs().max().item())


@pytest.mark.parametrize("method", ["siva", "kasa", "lora_xs"])
def test_export_then_import_round_trip(method, tmp_path):
    model, base = injected(tiny_llama, method, LLAMA_TARGETS)
    export_peft(model, tmp_path)
    fresh = copy.deepcopy(base)
    import_peft(fresh, tmp_path)
    assert rel_error(logits(fresh), logits(model)) <= RTOL


def _write_checkpoint(directory, config_changes=None, extra_tensors=None):
    from peft import LoraConfig
    base = tiny_llama()
    _train_peft(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        str(directory))
    path = directory / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw.update(config_changes or {})
    path.write_text(json.dumps(raw))
    if extra_tensors:
        from safetensors.torch import load_file, save_file
        tensors = load_file(directory / "adapter_model.safetensors")
        tensors.update(extra_tensors)
        save_file(tensors, directory / "adapter_model.safetensors")
    return base


@pytest.mark.parametrize("changes,message", [
    ({"use_dora": True}, "DoRA"),
    ({"lora_bias": True}, "lora_bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias='all'"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
])
def test_import_unsupported_features_raise(changes, message, tmp_path):
    base = _write_checkpoint(tmp_path, config_changes=changes)
    with pytest.raises(ValueError, match=re.escape(message)):
        import_peft(base, tmp_path)
    assert not adapted_layers(base)           # nothing changed


def test_import_non_linear_target_raises(tmp_path):
    base = _write_checkpoint(tmp_path, extra_tensors={
        "base_model.model.model.embed_tokens.lora_A.weight": torch.zeros(2, 128),
        "base_model.model.model.embed_tokens.lora_B.weight": torch.zeros(64, 2)})
    with pytest.raises(ValueError, match=r"'model\.embed_tokens', a Embedding.*nn\.Linear"):
        import_peft(base, tmp_path)
    assert not adapted_layers(base)


def test_import_unknown_tensor_raises(tmp_path):
    base = _write_checkpoint(tmp_path, extra_tensors={
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
            torch.ones(64)})
    with pytest.raises(ValueError, match="lora_magnitude_vector.*DoRA"):
        import_peft(base, tmp_path)


def test_import_rank_disagreeing_with_config_raises(tmp_path):
    base = _write_checkpoint(tmp_path, config_changes={"r": 3})
    with pytest.raises(ValueError, match="rank 2 but the config"):
        import_peft(base, tmp_path)


def test_import_into_injected_model_raises(tmp_path):
    base = _write_checkpoint(tmp_path)
    svk.inject(base, svk.AdapterConfig(method="lora", target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="already holds svk adapter layers"):
        import_peft(base, tmp_path)


def test_import_missing_module_raises(tmp_path):
    _write_checkpoint(tmp_path)
    other = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="does not have"):
        import_peft(other, tmp_path)


def test_import_keeps_peft_lora_dropout(tmp_path):
    """PEFT's lora_dropout becomes the svk layers' adapter dropout (and an invalid one is
    refused before the model changes)."""
    _write_checkpoint(tmp_path, {"lora_dropout": 0.1})
    model = tiny_llama()
    svk.import_peft(model, tmp_path)
    layers = svk.integrations.adapted_layers(model)
    assert layers and all(layer.dropout == 0.1 for layer in layers.values())
    assert model._svk_config.dropout == 0.1
    _write_checkpoint(tmp_path, {"lora_dropout": 1.5})
    fresh = tiny_llama()
    with pytest.raises(ValueError, match="dropout must be in"):
        svk.import_peft(fresh, tmp_path)
    assert not svk.integrations.adapted_layers(fresh)
