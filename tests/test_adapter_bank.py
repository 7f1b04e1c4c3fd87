"""AdapterBank on a tiny LLaMA: every row of a mixed batch reproduces exactly what a model
injected with that row's adapter alone produces (logits and greedy generation); add/remove
copy into preallocated slots; bad adapters, ids and capacity raise clear errors."""
import copy
import os

import pytest
import torch

from svk.integrations import AdapterConfig, adapted_layers, inject, read_adapter, save_adapter
from svk.serving import AdapterBank, BankLinear

transformers = pytest.importorskip("transformers")

CFG = AdapterConfig(method="lora_xs", rank=4, target_modules=["q_proj", "v_proj"])
N_ADAPTERS = 3


def tiny_llama():
    conf = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(1)
    return transformers.LlamaForCausalLM(conf).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The base model, three trained-looking adapters (cores large enough to change the
    outputs) saved with svk.save_adapter, and their injected models as the oracle."""
    base = tiny_llama()
    folder = tmp_path_factory.mktemp("adapters")
    paths, models = [], []
    torch.manual_seed(2)
    for k in range(N_ADAPTERS):
        model = copy.deepcopy(base)
        inject(model, CFG, progress=False)
        with torch.no_grad():
            for layer in adapted_layers(model).values():
                layer.core.normal_(0, 2.0)
        path = folder / f"user{k}.safetensors"
        save_adapter(model, path)
        paths.append(path)
        models.append(model)
    return base, paths, models


def make_bank(base, capacity=4, **kw):
    model = copy.deepcopy(base)
    return model, AdapterBank(model, CFG, capacity=capacity, **kw)


def prompts(batch, length=6):
    return torch.randint(0, 64, (batch, length))


@torch.no_grad()
def test_mixed_batch_reproduces_each_adapter(setup):
    base, paths, models = setup
    model, bank = make_bank(base)
    for k, path in enumerate(paths):
        assert bank.add(f"user{k}", path) == k
    assert bank.names == ["user0", "user1", "user2"]
    x = prompts(5)
    order = ["user2", -1, "user0", "user1", "user2"]
    with bank.activate(order):
        logits = model(x).logits
        generated = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6,
                                   do_sample=False, pad_token_id=0)
    for row, who in enumerate(order):
        oracle = base if who == -1 else models[int(who[-1])]
        expected = oracle(x[row:row + 1]).logits[0]
        torch.testing.assert_close(logits[row], expected, rtol=1e-5, atol=1e-5)
        expected_gen = oracle.generate(x[row:row + 1], attention_mask=torch.ones_like(x[:1]),
                                       max_new_tokens=6, do_sample=False, pad_token_id=0)[0]
        assert torch.equal(generated[row], expected_gen), f"row {row} ({who})"
        if who != -1:   # the adapters really change the model
            assert (logits[row] - base(x[row:row + 1]).logits[0]).abs().max() > 1e-2


@torch.no_grad()
def test_per_token_ids_and_tensor_ids(setup):
    base, paths, _ = setup
    model, bank = make_bank(base)
    for k, path in enumerate(paths):
        bank.add(f"user{k}", path)
    x = prompts(3)
    per_sequence = torch.tensor([1, 0, -1])
    with bank.activate(per_sequence) as served:
        # Copied into the bank's preallocated buffer: compiled and captured graphs read it.
        assert served.data_ptr() == bank.ids_buffer.data_ptr()
        assert served.tolist() == [1, 0, -1]
        a = model(x).logits
    with bank.activate(per_sequence[:, None].expand(3, 6)):
        b = model(x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@torch.no_grad()
def test_remove_frees_slot_and_serving_it_raises(setup):
    base, paths, models = setup
    model, bank = make_bank(base, capacity=2)
    bank.add("a", paths[0])
    bank.add("b", paths[1])
    storage = [layer.cores.data_ptr() for layer in bank.layers.values()]
    with pytest.raises(RuntimeError, match=r"the bank is full \(capacity 2\)"):
        bank.add("c", paths[2])
    assert bank.remove("a") == 0
    assert "a" not in bank and bank.names == ["b"]
    with pytest.raises(ValueError, match="adapter slot 0 is empty"):
        with bank.activate([0]):
            pass
    with pytest.raises(KeyError, match="no adapter named 'a'"):
        with bank.activate(["a"]):
            pass
    assert bank.add("c", paths[2]) == 0          # the freed slot is reused
    assert [layer.cores.data_ptr() for layer in bank.layers.values()] == storage
    x = prompts(2)
    with bank.activate(["c", "b"]):
        logits = model(x).logits
    torch.testing.assert_close(logits[0], models[2](x[:1]).logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1], models[1](x[1:]).logits[0], rtol=1e-5, atol=1e-5)
    with bank.activate(["b"]):
        with pytest.raises(RuntimeError, match="is being served"):
            bank.remove("b")


def test_state_dict_nbytes_and_ids(setup):
    base, paths, models = setup
    model, bank = make_bank(base, capacity=10)
    state = {f"{name}.core": layer.core.detach() for name, layer in
             adapted_layers(models[0]).items()}
    assert bank.add("sd", state) == 0
    assert len(bank.layers) == 4 and all(isinstance(m, BankLinear) for m in bank.layers.values())
    assert bank.nbytes == 10 * 4 * 4 * 4 * 4          # capacity × layers × r² × fp32
    with pytest.raises(ValueError, match="already in the bank"):
        bank.add("sd", state)
    with pytest.raises(ValueError, match=r"outside \[-1, 9\]"):
        bank.ids([10])
    with pytest.raises(TypeError, match="integer tensor"):
        bank.ids(torch.zeros(2))
    with pytest.raises(TypeError, match="one id per sequence"):
        bank.ids("sd")
    with pytest.raises(RuntimeError, match="outside `with bank.activate"):
        model(prompts(1))


def test_incompatible_adapters_are_refused(setup, tmp_path):
    base, paths, _ = setup
    model, bank = make_bank(base)
    # Different rank.
    other = copy.deepcopy(base)
    inject(other, AdapterConfig(method="lora_xs", rank=2, target_modules=["q_proj", "v_proj"]),
           progress=False)
    save_adapter(other, tmp_path / "rank2.safetensors")
    with pytest.raises(ValueError, match="rank 4 in the bank but 2 in the file"):
        bank.add("r2", tmp_path / "rank2.safetensors")
    # Different layers.
    other = copy.deepcopy(base)
    inject(other, AdapterConfig(method="lora_xs", rank=4, target_modules=["q_proj"]),
           progress=False)
    save_adapter(other, tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match="adapter layers differ"):
        bank.add("q", tmp_path / "q.safetensors")
    # Different base weights: the file's base fingerprint (format 2) does not match; without
    # it (a state dict holding s), the singular values do not.
    other = tiny_llama()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    inject(other, CFG, progress=False)
    save_adapter(other, tmp_path / "base.safetensors")
    with pytest.raises(ValueError, match="base weight differs from the one the adapter was"):
        bank.add("base", tmp_path / "base.safetensors")
    with pytest.raises(ValueError, match="different base model"):
        bank.add("base", dict(read_adapter(tmp_path / "base.safetensors").tensors))
    # Frozen a/b stored in the file must be the bank's.
    file = read_adapter(paths[0])
    name = next(iter(bank.layers))
    tensors = dict(file.tensors)
    tensors[f"{name}.a"] = -bank.layers[name].a.detach()
    with pytest.raises(ValueError, match=rf"{name}.a differs"):
        bank.add("flipped", tensors)
    # A core of the wrong shape in a state dict.
    tensors = {f"{n}.core": torch.randn(3, 3) for n in bank.layers}
    with pytest.raises(ValueError, match=r"expected \(4, 4\)"):
        bank.add("bad", tensors)
    assert len(bank) == 0           # nothing was half-added
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        AdapterBank(copy.deepcopy(base), CFG, capacity=0)
    with pytest.raises(ValueError, match="LoRA-XS"):
        AdapterBank(copy.deepcopy(base), AdapterConfig(method="siva", target_modules=["q_proj"]),
                    capacity=2)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                    reason="CPU tensors through backend='triton' need the interpreter; the "
                           "gpu tests cover the compiled kernels")
@torch.no_grad()
def test_bank_through_triton_kernels(setup, monkeypatch):
    """The same mixed batch through the Triton one-pass kernel (interpreter on CPU)."""
    base, paths, models = setup
    model, bank = make_bank(base)
    for k, path in enumerate(paths):
        bank.add(f"user{k}", path)
    x = prompts(2, length=3)
    for layer in bank.layers.values():
        layer.backend = "triton"
    with bank.activate(["user1", "user0"]):
        logits = model(x).logits
    torch.testing.assert_close(logits[0], models[1](x[:1]).logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1], models[0](x[1:]).logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_cuda_graph_decode_step(setup):
    """A whole-model decode step (one token per sequence, every row its own adapter) captured
    once in a CUDA graph and replayed for another batch of adapters by rewriting the static ids
    in place: the replay gives what eager serving of the new ids gives."""
    base, paths, models = setup
    model, bank = make_bank(copy.deepcopy(base).cuda())
    for k, path in enumerate(paths):
        bank.add(f"user{k}", path)
    tokens = prompts(4, length=1).cuda()
    static_ids = torch.tensor([0, 1, 2, -1], device="cuda")
    with bank.activate(static_ids):
        side = torch.cuda.Stream()                      # warm-up (autotuning, compilation)
        side.wait_stream(torch.cuda.current_stream())   # on a side stream, as capture wants
        with torch.cuda.stream(side):
            model(tokens)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = model(tokens).logits
    new_ids = torch.tensor([2, -1, 0, 1], device="cuda")
    static_ids.copy_(new_ids)
    with bank.activate(static_ids):                     # re-validates the rewritten ids
        graph.replay()
        torch.cuda.synchronize()
        expected = model(tokens).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    with bank.activate(torch.tensor([0, 1, 2, -1], device="cuda")):
        assert (model(tokens).logits - expected).abs().max() > 1e-3   # the ids mattered
