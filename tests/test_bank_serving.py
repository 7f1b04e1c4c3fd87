"""AdapterBank's serving model: the ids buffer under torch.compile and CUDA graphs, threads,
banks on injected models, the ids' layout, refused banks leaving the model unchanged, an empty
bank, nesting, and one adapter served through merged weights."""
import copy
import threading

import pytest
import torch
from torch import nn

from svk.integrations import AdapterConfig, adapted_layers, inject
from svk.serving import AdapterBank, BankLinear

transformers = pytest.importorskip("transformers")

CFG = AdapterConfig(method="lora_xs", rank=4, target_modules=["q_proj", "v_proj", "down_proj"])
N_ADAPTERS = 3
# Unit of the forward-pass tolerances below: two fp32 paths through the same tiny model that
# differ only in summation order agree to ~1e-6 relative (logits are O(1)); 1e-5 leaves room.
TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_llama():
    conf = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(1)
    return transformers.LlamaForCausalLM(conf).eval()


@pytest.fixture(scope="module")
def setup():
    """The base model, N adapters as state dicts (cores large enough to change the outputs)
    and, as the oracle, a model injected with each adapter alone."""
    base = tiny_llama()
    adapters, oracles = [], []
    for k in range(N_ADAPTERS):
        model = copy.deepcopy(base)
        inject(model, CFG, progress=False)
        generator = torch.Generator().manual_seed(10 + k)
        with torch.no_grad():
            for layer in adapted_layers(model).values():
                layer.core.copy_(torch.randn(layer.core.shape, generator=generator))
        adapters.append({f"{n}.core": layer.core.detach().clone()
                         for n, layer in adapted_layers(model).items()})
        oracles.append(model)
    return base, adapters, oracles


def make_bank(setup, capacity=4, **kw):
    base, adapters, _ = setup
    model = copy.deepcopy(base)
    bank = AdapterBank(model, CFG, capacity=capacity, **kw)
    for k, adapter in enumerate(adapters):
        assert bank.add(f"user{k}", adapter) == k
    return model, bank


def expected_logits(setup, tokens, users):
    """Row by row, the model injected with that row's adapter alone (-1: the base)."""
    base, _, oracles = setup
    with torch.no_grad():
        return torch.cat([(base if user == -1 else oracles[user])(tokens[i:i + 1]).logits
                          for i, user in enumerate(users)])


def tokens_for(batch, length=1, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- the serving step ---------------------------------------------------------------------
@torch.no_grad()
def test_ids_buffer_is_preallocated_and_written_in_place(setup):
    model, bank = make_bank(setup, max_batch=8)
    buffer = bank.ids_buffer
    assert buffer.shape == (8,) and buffer.dtype == torch.int64
    with bank.activate(["user2", -1, "user0"]) as ids:
        first = ids
        assert ids.data_ptr() == buffer.data_ptr() and ids.tolist() == [2, -1, 0]
        layer = next(iter(bank.layers.values()))
        assert layer._ids is ids                      # every layer passes the same view
    with bank.activate(torch.tensor([1, 1, 2], dtype=torch.int32)) as ids:
        assert ids is first and buffer[:3].tolist() == [1, 1, 2]   # same storage, rewritten
    assert bank.ids_buffer is buffer
    with pytest.raises(ValueError, match=r"do not fit the bank's ids buffer \(max_batch=8\)"):
        with bank.activate([-1] * 9):
            pass


def test_bank_layer_forward_is_one_op_call(setup, monkeypatch):
    """The decode path of a bank layer calls the op once and nothing else of svk's: no
    per-layer validation of the ids beyond the op's own shape check."""
    import svk.serving.bank as bank_module
    model, bank = make_bank(setup)
    calls = []
    real = bank_module._sv_bank_linear

    def counting(*args, **kwargs):
        calls.append(kwargs["device_check"])
        return real(*args, **kwargs)

    monkeypatch.setattr(bank_module, "_sv_bank_linear", counting)
    with torch.no_grad(), bank.activate(["user0", "user1"]):
        model(tokens_for(2))
    assert calls == [False] * len(bank.layers)


@pytest.mark.slow
@torch.no_grad()
def test_compiled_decode_step_matches_eager_without_recompiling(setup):
    """A whole-model decode step (one token per sequence) under torch.compile (inductor on
    CPU) gives eager's logits for several id sets, compiled once: activate rewrites the ids
    buffer the graph reads, add/remove write into the preallocated cores: neither changes what
    the graph was specialised on."""
    model, bank = make_bank(setup)
    torch._dynamo.reset()
    step = torch.compile(lambda tokens: model(tokens, use_cache=False).logits,
                         backend="inductor")
    tokens = tokens_for(4, seed=3)
    id_sets = [[0, 1, 2, -1], [2, 2, 0, 1], [-1, -1, -1, -1], [1, 0, -1, 2]]
    with bank.activate(id_sets[0]):
        compiled = step(tokens)                      # compiles here
        eager = model(tokens, use_cache=False).logits
    # Inductor fuses and reorders fp32 reductions: agreement to a few ulps of O(1) logits.
    torch.testing.assert_close(compiled, eager, **TOL)
    torch.testing.assert_close(eager, expected_logits(setup, tokens, id_sets[0]), **TOL)
    with torch.compiler.set_stance("fail_on_recompile"):
        for users in id_sets[1:]:
            with bank.activate(users):
                compiled = step(tokens)
                eager = model(tokens, use_cache=False).logits
            torch.testing.assert_close(compiled, eager, **TOL)
            torch.testing.assert_close(compiled, expected_logits(setup, tokens, users), **TOL)
        # Adding and removing adapters copies into the preallocated cores: no recompile.
        late = {key: -core for key, core in setup[1][0].items()}
        bank.remove("user1")
        assert bank.add("late", late) == 1
        with bank.activate(["late", "user0", -1, "late"]):
            compiled = step(tokens)
            eager = model(tokens, use_cache=False).logits
        torch.testing.assert_close(compiled, eager, **TOL)
        assert (compiled[0] - expected_logits(setup, tokens, [0, 0, 0, 0])[0]).abs().max() > 1e-3
        with bank.activate([0, 1, 2]):               # the stance does catch a recompile
            with pytest.raises(RuntimeError, match="fail_on_recompile|[Rr]ecompil"):
                step(tokens[:3])
    torch._dynamo.reset()


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_cuda_graph_whole_model_decode_step(setup):
    """The recipe of the serving model: warm up once per batch size (bank.warmup: svk.warmup
    inside an activation of that size, so autotuning happens outside capture; then one eager
    call on a side stream, as torch.cuda.graph wants), capture one decode step per batch size
    inside activate, then serve new ids by rewriting the buffer in place (activate) and
    replaying."""
    base, adapters, _ = setup
    model = copy.deepcopy(base).cuda()
    bank = AdapterBank(model, CFG, capacity=4)
    for k, adapter in enumerate(adapters):
        bank.add(f"user{k}", adapter)
    bank.warmup(batch_sizes=[1, 4], seq_lens=[1])     # every kernel tunes before capture
    graphs = {}
    for batch in (1, 4):
        tokens = tokens_for(batch, seed=batch).cuda()
        ids = [k % 4 - 1 for k in range(batch)]
        with bank.activate(ids):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):             # warm-up, on a side stream as capture wants
                model(tokens, use_cache=False)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = model(tokens, use_cache=False).logits
        graphs[batch] = (graph, tokens, logits)
    for batch, users in ((4, [2, -1, 0, 1]), (1, [1]), (4, [0, 0, 2, 2])):
        graph, tokens, logits = graphs[batch]
        with bank.activate(users):
            graph.replay()
            torch.cuda.synchronize()
            expected = model(tokens, use_cache=False).logits
        torch.testing.assert_close(logits, expected, **TOL)
        with bank.activate([-1] * batch):
            assert (model(tokens, use_cache=False).logits - expected).abs().max() > 1e-3


@torch.no_grad()
def test_warmup_runs_every_batch_size_inside_an_activation(setup, monkeypatch):
    import svk.warmup
    model, bank = make_bank(setup)
    seen = []
    real = svk.warmup.warmup

    def spy(module, batch_sizes, seq_lens, **kwargs):
        seen.append((batch_sizes, list(bank.ids_buffer[:batch_sizes[0]].tolist())))
        return real(module, batch_sizes=batch_sizes, seq_lens=seq_lens, **kwargs)

    monkeypatch.setattr(svk.warmup, "warmup", spy)
    bank.warmup(batch_sizes=[1, 4], seq_lens=[1, 3])
    assert seen == [([1], [0]), ([4], [0, 1, 2, 0])]     # the resident adapters in turn
    with pytest.raises(RuntimeError, match="outside `with bank.activate"):
        model(tokens_for(1))                              # and the bank is inactive after
    empty = AdapterBank(copy.deepcopy(setup[0]), CFG, capacity=1)
    empty.warmup(batch_sizes=[2])                         # base rows when nothing is resident
    with pytest.raises(ValueError, match="batch_sizes must hold positive ints"):
        bank.warmup(batch_sizes=[0])


# ---- threads ------------------------------------------------------------------------------
@torch.no_grad()
def test_threads_never_serve_each_others_adapters(setup):
    model, bank = make_bank(setup)
    tokens = tokens_for(2, seed=5)
    expected = {k: expected_logits(setup, tokens, [k, k]) for k in range(2)}
    start = threading.Barrier(2)
    errors, wrong = [], []

    def user(k):
        try:
            start.wait(timeout=30)
            for _ in range(15):
                with bank.activate([f"user{k}"] * 2):
                    logits = model(tokens).logits
                if not torch.allclose(logits, expected[k], **TOL):
                    wrong.append(k)
        except Exception as error:   # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=user, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors and not wrong, (errors, wrong)
    with pytest.raises(RuntimeError, match="outside `with bank.activate"):
        model(tokens)                                   # both blocks ended: inactive


@torch.no_grad()
def test_other_thread_cannot_use_or_remove_what_one_thread_serves(setup):
    model, bank = make_bank(setup)
    tokens = tokens_for(2, seed=6)
    entered, done = threading.Event(), threading.Event()

    def server():
        with bank.activate(["user0", "user1"]):
            entered.set()
            done.wait(timeout=60)

    thread = threading.Thread(target=server)
    thread.start()
    try:
        assert entered.wait(timeout=60)
        # This thread never entered activate: the other thread's ids are not its own.
        with pytest.raises(RuntimeError, match="outside `with bank.activate.*in this thread"):
            model(tokens)
        with pytest.raises(RuntimeError, match="another thread has been serving"):
            with bank.activate(["user2", "user2"], timeout=0.05):
                pass
        with pytest.raises(RuntimeError, match="'user1' \\(slot 1\\) is being served"):
            bank.remove("user1")
        assert bank.remove("user2") == 2          # a slot nobody serves can go
        assert bank.add("user2", setup[1][2]) == 2
    finally:
        done.set()
        thread.join(timeout=60)
    with bank.activate(["user2", "user1"]):      # the other block ended: this thread's turn
        torch.testing.assert_close(model(tokens).logits,
                                   expected_logits(setup, tokens, [2, 1]), **TOL)


@torch.no_grad()
def test_nested_blocks_restore_the_outer_ids(setup):
    model, bank = make_bank(setup)
    outer, inner = tokens_for(3, seed=7), tokens_for(2, seed=8)
    with bank.activate(["user0", "user1", "user2"]):
        with bank.activate([2, 0]):               # the same thread may nest, any batch size
            torch.testing.assert_close(model(inner).logits,
                                       expected_logits(setup, inner, [2, 0]), **TOL)
        torch.testing.assert_close(model(outer).logits,
                                   expected_logits(setup, outer, [0, 1, 2]), **TOL)
        with pytest.raises(RuntimeError, match="being served"):
            bank.remove("user0")
    bank.remove("user0")                          # nothing serves it any more


@torch.no_grad()
def test_blocks_ending_out_of_order_raise_and_leave_the_bank_consistent(setup):
    """Two interleaved blocks of one thread (what two coroutines awaiting inside their blocks
    would do): the one that ends out of order raises; the other is served, then none."""
    model, bank = make_bank(setup)
    tokens = tokens_for(1, seed=10)
    first, second = bank.activate(["user0"]), bank.activate(["user1"])
    first.__enter__()
    second.__enter__()
    with pytest.raises(RuntimeError, match="ended out of order"):
        first.__exit__(None, None, None)
    torch.testing.assert_close(model(tokens).logits, expected_logits(setup, tokens, [1]), **TOL)
    with pytest.raises(RuntimeError, match="being served"):
        bank.remove("user1")
    bank.remove("user0")                          # its block is gone
    second.__exit__(None, None, None)
    with pytest.raises(RuntimeError, match="outside `with bank.activate"):
        model(tokens)
    with bank.activate(["user1"], timeout=0):     # the lock was released every time
        pass


@torch.no_grad()
def test_copied_bank_model_is_inactive_and_the_bank_unaffected(setup):
    model, bank = make_bank(setup)
    tokens = tokens_for(1, seed=15)
    with bank.activate(["user2"]):
        copied = copy.deepcopy(model)         # serving state is never copied
        with pytest.raises(RuntimeError, match="outside `with bank.activate"):
            copied(tokens)
        torch.testing.assert_close(model(tokens).logits, expected_logits(setup, tokens, [2]),
                                   **TOL)


# ---- an empty bank --------------------------------------------------------------------------
@torch.no_grad()
def test_empty_bank_serves_the_base_model_and_refuses_empty_slots(setup):
    base = setup[0]
    model = copy.deepcopy(base)
    bank = AdapterBank(model, CFG, capacity=2)
    tokens = tokens_for(2, length=3, seed=9)
    with bank.activate([-1, None]):
        logits = model(tokens).logits
    # Rows with id -1 are the base layer's output plus an exact zero.
    torch.testing.assert_close(logits, base(tokens).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="adapter slot 0 is empty"):
        with bank.activate([0, -1]):
            pass
    with pytest.raises(KeyError, match="no adapter named 'alice'"):
        with bank.activate(["alice"]):
            pass


def test_file_from_a_base_with_the_same_spectrum_is_refused(setup, tmp_path):
    """A base whose adapted weights have their rows permuted has the same singular values
    (the file's s passes) but other singular vectors: the base fingerprint refuses it."""
    from svk.integrations import save_adapter
    base = setup[0]
    other = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in other.named_modules():
            if CFG.matches(name):
                module.weight.copy_(module.weight.flip(0))
    inject(other, CFG, progress=False)
    save_adapter(other, tmp_path / "permuted.safetensors")
    model, bank = make_bank(setup)
    with pytest.raises(ValueError, match="base weight differs"):
        bank.add("permuted", tmp_path / "permuted.safetensors")
    assert "permuted" not in bank
    same = copy.deepcopy(setup[2][0])                 # the bank's own base: accepted
    save_adapter(same, tmp_path / "same.safetensors")
    assert bank.add("same", tmp_path / "same.safetensors") == 3


@torch.no_grad()
def test_a_non_finite_adapter_does_not_reach_base_rows(setup):
    """Issue 14 item 6 through the bank: a NaN adapter in slot 0 leaves every -1 row the base
    model's output, exactly (same batch, same GEMMs, plus an exact zero)."""
    base = setup[0]
    model = copy.deepcopy(base)
    bank = AdapterBank(model, CFG, capacity=2)
    bank.add("bad", {f"{n}.core": torch.full((4, 4), float("nan")) for n in bank.layers})
    tokens = tokens_for(3, length=2, seed=16)
    with bank.activate([-1, "bad", -1]):
        logits = model(tokens).logits
    assert logits[1].isnan().all()
    expected = base(tokens).logits
    torch.testing.assert_close(logits[0::2], expected[0::2], rtol=0, atol=0)


# ---- a bank on a model already injected -------------------------------------------------------
@torch.no_grad()
def test_bank_keeps_an_injected_models_cores(setup):
    _, _, oracles = setup
    model = copy.deepcopy(oracles[1])                      # injected with CFG, trained cores
    bank = AdapterBank(model, CFG, capacity=3)
    assert bank.names == ["__injected__"] and bank.slot("__injected__") == 0
    tokens = tokens_for(2, length=3, seed=11)
    with bank.activate(["__injected__", -1]):
        logits = model(tokens).logits
    torch.testing.assert_close(logits, expected_logits(setup, tokens, [1, -1]), **TOL)
    named = AdapterBank(copy.deepcopy(oracles[2]), CFG, capacity=2, injected_name="mine")
    assert named.names == ["mine"]
    dropped = AdapterBank(copy.deepcopy(oracles[2]), CFG, capacity=2, injected_name=None)
    assert dropped.names == []


@pytest.mark.parametrize("cfg, message", [
    (AdapterConfig(method="lora_xs", rank=8, target_modules=["q_proj", "v_proj", "down_proj"]),
     "has rank 4 but cfg says rank 8"),
    (AdapterConfig(method="lora_xs", rank=4, alpha=4.0,
                   target_modules=["q_proj", "v_proj", "down_proj"]),
     r"has scaling 4.0 but cfg gives 1.0"),
    (AdapterConfig(method="lora_xs", rank=4, target_modules=["q_proj", "v_proj"]),
     "'model.layers.0.mlp.down_proj' is not in cfg.target_modules"),
    (AdapterConfig(method="lora_xs", rank=4,
                   target_modules=["q_proj", "v_proj", "down_proj", "k_proj"]),
     "matches layers the model was not injected with: \\['model.layers.0.self_attn.k_proj'"),
])
def test_bank_refuses_a_cfg_that_disagrees_with_the_injected_layers(setup, cfg, message):
    _, _, oracles = setup
    model = copy.deepcopy(oracles[0])
    layers = dict(adapted_layers(model))
    with pytest.raises(ValueError, match=message):
        AdapterBank(model, cfg, capacity=2)
    assert dict(adapted_layers(model)) == layers          # the same modules, unconverted


# ---- refused banks leave the model unchanged ----------------------------------------------------
@torch.no_grad()
def test_refused_bank_leaves_the_model_unchanged(setup):
    _, _, oracles = setup
    model = copy.deepcopy(oracles[0])
    layers = dict(adapted_layers(model))
    last = list(layers)[-1]
    layers[last].merge()                                  # one layer (the last) merged
    tokens = tokens_for(2, length=3, seed=12)
    before = model(tokens).logits
    with pytest.raises(ValueError, match=f"layer '{last}' is merged"):
        AdapterBank(model, CFG, capacity=2)
    assert not any(isinstance(m, BankLinear) for m in model.modules())
    assert dict(adapted_layers(model)) == layers
    torch.testing.assert_close(model(tokens).logits, before, rtol=0, atol=0)
    layers[last].unmerge()
    bank = AdapterBank(model, CFG, capacity=2)            # a second bank works
    with bank.activate(["__injected__", -1]):
        torch.testing.assert_close(model(tokens).logits,
                                   expected_logits(setup, tokens, [0, -1]), **TOL)


def test_refused_foreign_bank_leaves_the_model_unchanged(setup):
    model = copy.deepcopy(setup[0])
    inject(model, AdapterConfig(method="siva", target_modules=["q_proj"]), progress=False)
    layers = dict(adapted_layers(model))
    with pytest.raises(ValueError, match=r"holds \['siva'\] adapter layers"):
        AdapterBank(model, CFG, capacity=2)
    assert dict(adapted_layers(model)) == layers
    assert not any(isinstance(m, BankLinear) for m in model.modules())


def test_failure_after_inject_restores_the_original_model(setup, monkeypatch):
    """The bank injects a plain model itself: when anything after that fails, the model's own
    modules, requires_grad flags and attributes come back."""
    model = copy.deepcopy(setup[0])
    model.lm_head.weight.requires_grad_(True)
    model.model.norm.weight.requires_grad_(False)
    modules = dict(model.named_modules())
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    real, built = BankLinear.__init__, []

    def failing(self, *args, **kwargs):
        if len(built) == 3:
            raise torch.OutOfMemoryError("no room for the cores")
        built.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(BankLinear, "__init__", failing)
    with pytest.raises(torch.OutOfMemoryError):
        AdapterBank(model, CFG, capacity=2)
    monkeypatch.undo()
    assert dict(model.named_modules()) == modules
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert not adapted_layers(model) and "_svk_config" not in vars(model)
    bank = AdapterBank(model, CFG, capacity=2)            # a second bank works
    assert len(bank.layers) == 6


# ---- layout -----------------------------------------------------------------------------------
class SeqFirst(nn.Module):
    """A plain PyTorch block whose activations are (seq, batch, features)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)


CFG_PROJ = AdapterConfig(method="lora_xs", rank=2, target_modules=["proj"])


@torch.no_grad()
def test_layout_is_explicit_and_ambiguity_refused():
    torch.manual_seed(3)
    base = SeqFirst()
    oracle = copy.deepcopy(base)
    inject(oracle, CFG_PROJ, progress=False)
    core = torch.randn(2, 2) * 3
    oracle.proj.core.copy_(core)
    adapter = {"proj.core": core}

    def bank_for(batch_first):
        model = copy.deepcopy(base)
        bank = AdapterBank(model, CFG_PROJ, capacity=2, batch_first=batch_first)
        bank.add("u", adapter)
        return model, bank

    x = torch.randn(3, 3, 8)                         # seq == batch
    ids = ["u", -1, "u"]
    per_sequence = torch.stack([oracle(x[:, 0]), base(x[:, 1]), oracle(x[:, 2])], dim=1)
    # Not told (a plain model): one id per sequence is ambiguous when seq == batch.
    model, bank = bank_for(None)
    assert bank.batch_first is None
    with bank.activate(ids):
        with pytest.raises(ValueError, match="ambiguous.*batch_first=True.*batch_first=False"):
            model(x)
        model(torch.randn(3, 2, 8))                  # dims differ: dim 0 is the batch
        with pytest.raises(ValueError, match="a sequence-first model.*batch_first=False"):
            model(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="per-token adapter ids of shape \\(3, 3\\) are ambiguous"):
        with bank.activate(torch.zeros(3, 3, dtype=torch.int64)):
            pass
    # Told: sequence-first, ids along dim 1 (per sequence) or laid out per token.
    model, bank = bank_for(False)
    with bank.activate(ids):
        torch.testing.assert_close(model(x), per_sequence, **TOL)
        with pytest.raises(ValueError, match="sequence-first: batch is dim 1"):
            model(torch.randn(3, 2, 8))
    with bank.activate(torch.tensor([[0, 0, 0], [-1, -1, -1], [0, 0, 0]])):   # (batch, seq)
        torch.testing.assert_close(model(x), per_sequence, **TOL)
    # Told batch-first: ids along dim 0, whatever the shape.
    model, bank = bank_for(True)
    with bank.activate(ids):
        y = model(x)
    expected = torch.stack([oracle(x[0]), base(x[1]), oracle(x[2])])
    torch.testing.assert_close(y, expected, **TOL)


def test_hugging_face_models_are_batch_first(setup):
    model, bank = make_bank(setup)
    assert bank.batch_first is True
    tokens = tokens_for(3, length=3, seed=13)                # batch == seq_len: not ambiguous
    with torch.no_grad(), bank.activate(["user0", -1, "user2"]):
        torch.testing.assert_close(model(tokens).logits,
                                   expected_logits(setup, tokens, [0, -1, 2]), **TOL)
    with pytest.raises(TypeError, match="batch_first must be True, False or None"):
        AdapterBank(copy.deepcopy(setup[0]), CFG, capacity=1, batch_first=1)


# ---- one adapter for the whole batch: merged weights --------------------------------------------
@torch.no_grad()
def test_merged_serves_one_adapter_like_svk_merge(setup):
    from svk.integrations import merge
    model, bank = make_bank(setup)
    weights = {n: layer.weight.detach().clone() for n, layer in bank.layers.items()}
    tokens = tokens_for(3, length=4, seed=14)
    oracle = copy.deepcopy(setup[2][1])
    merge(oracle)
    with bank.merged("user1"):
        logits = model(tokens).logits
        with pytest.raises(RuntimeError, match="being served"):
            bank.remove("user1")
        with bank.activate(["user0", -1, "user2"]):     # nested: the bank path again
            torch.testing.assert_close(model(tokens).logits,
                                       expected_logits(setup, tokens, [0, -1, 2]), **TOL)
        assert torch.equal(model(tokens).logits, logits)   # merged again after the inner block
    # The same weights svk.merge writes, so the same logits bit for bit.
    torch.testing.assert_close(logits, oracle(tokens).logits, rtol=0, atol=0)
    torch.testing.assert_close(logits, expected_logits(setup, tokens, [1, 1, 1]), **TOL)
    assert all(torch.equal(layer.weight, weights[n]) for n, layer in bank.layers.items())
    assert all(layer._merged_weight is None for layer in bank.layers.values())
    with pytest.raises(RuntimeError, match="outside `with bank.activate"):
        model(tokens)
    with pytest.raises(KeyError, match="no adapter named 'nobody'"):
        with bank.merged("nobody"):
            pass
    with bank.activate([-1]):                         # the failed block left nothing held
        model(tokens[:1])
