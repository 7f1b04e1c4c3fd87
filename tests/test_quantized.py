"""Quantized base weights (svk.nn.quantized, svk.ops.sv_delta; DESIGN.md §8, issue 17).

Every method on a tiny LLaMA whose linear layers are bitsandbytes Linear8bitLt (threshold 0),
Linear4bit nf4 / fp4, or torchao int8 weight-only, against the same svk adapter on the
dequantized weights (the "twin"). bitsandbytes and torchao are optional: the tests of a
quantizer skip, with the reason, when its package is absent.

Tolerance of the twin comparisons: max(1e-5, 4·e0), e0 the quantized base model's own logits
deviation from its dequantized twin, measured in the same test. The quantized layer computes
x·dequantize(W)ᵀ with its own kernel and rounding (measured e0: int8 1.8e-7, torchao 2.4e-7,
4-bit 0 on CPU, where bitsandbytes dequantizes and calls F.linear), and the adapter adds no
more than the twin's own fp32 rounding (measured differences ≤ 3e-7 on logits of size 0.5,
≤ 8e-8 on gradients of size 0.1), so 1e-5 is ~30× the measured gap and far below the
adapters' effect (perturbed adapter tensors of size 0.1 move logits by ~1e-2).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import svk
from svk.integrations.inject import adapted_layers
from svk.nn import METHODS
from svk.nn.quantized import QuantizedSVLinear, dequantize, is_quantized, quantized_class
from svk.ops.sv_delta import sv_delta, sv_delta_op, sv_mixture_delta, sv_mixture_delta_op

transformers = pytest.importorskip("transformers")

KINDS = ("int8", "nf4", "fp4", "torchao")
RANKED = {"lora_xs": 4, "lora": 4, "pissa": 4, "kasa": 4}


def _require(kind):
    if kind == "torchao":
        pytest.importorskip("torchao", reason="torchao is not installed (optional test dependency)")
    else:
        pytest.importorskip("bitsandbytes",
                            reason="bitsandbytes is not installed (optional test dependency)")


def _tiny_llama(seed=0):
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def _quantize(model, kind):
    """Every nn.Linear but lm_head quantized in place (bitsandbytes quantizes on .to())."""
    if kind == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
        quantize_(model, Int8WeightOnlyConfig(),
                  filter_fn=lambda m, name: isinstance(m, nn.Linear) and name != "lm_head")
        return model
    import bitsandbytes as bnb
    for name, m in list(model.named_modules()):
        if not isinstance(m, nn.Linear) or name == "lm_head":
            continue
        if kind == "int8":
            q = bnb.nn.Linear8bitLt(m.in_features, m.out_features, m.bias is not None,
                                    has_fp16_weights=False, threshold=0.0)
        else:
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, m.bias is not None,
                                  compute_dtype=torch.float32, quant_type=kind)
        q.load_state_dict(m.state_dict())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q.to("cpu"))
    return model


def _twin(quantized, seed=0):
    """The float model with each quantized layer's weight replaced by its dequantized weight."""
    twin = _tiny_llama(seed)
    for name, m in quantized.named_modules():
        if is_quantized(m):
            twin.get_submodule(name).weight.data = dequantize(m).clone()
    return twin


def _codes(model):
    """Every quantized tensor (codes and scales) of the model, cloned, by the name of the
    quantized layer (before inject) or of the svk layer holding it (after)."""
    out = {}
    for name, layer in model.named_modules():
        if not is_quantized(layer):
            continue
        w = layer.weight
        if hasattr(w, "qdata"):                                  # torchao Int8Tensor
            tensors = (w.qdata, w.scale)
        elif getattr(w, "quant_state", None) is not None:        # bnb 4-bit
            tensors = (w.data, w.quant_state.absmax)
        else:                                                    # bnb int8
            tensors = (w.data, w.SCB if getattr(w, "SCB", None) is not None else layer.state.SCB)
        out[name.removesuffix(".base_layer")] = tuple(t.clone() for t in tensors)
    return out


_BASES: dict = {}


def _bases(kind):
    """(quantized, twin, e0) per quantizer, built once; tests deep-copy them."""
    if kind not in _BASES:
        quantized = _quantize(_tiny_llama(), kind)
        twin = _twin(quantized)
        with torch.no_grad():
            e0 = (quantized(IDS).logits - twin(IDS).logits).abs().max().item()
        _BASES[kind] = (quantized, twin, e0)
    quantized, twin, e0 = _BASES[kind]
    return copy.deepcopy(quantized), copy.deepcopy(twin), e0


IDS = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))


def _cfg(method, **extra):
    return svk.AdapterConfig(method=method, target_modules="all-linear",
                             rank=RANKED.get(method), **extra)


def _perturb_alike(*models, seed=1, scale=0.1):
    """The same random values in every trainable tensor of each model (by name): at init the
    update is zero for several methods (b = 0, s = 0, out_scale = 0)."""
    generator = torch.Generator().manual_seed(seed)
    params = [dict(m.named_parameters()) for m in models]
    with torch.no_grad():
        for name, p in params[0].items():
            if p.requires_grad:
                value = torch.randn(p.shape, generator=generator) * scale
                for ps in params:
                    ps[name].copy_(value)


def _trainable_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


# ---- every quantizer × every method against the dequantized twin -----------------------------
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", KINDS)
def test_matches_the_adapter_on_the_dequantized_weights(kind, method):
    _require(kind)
    quantized, twin, e0 = _bases(kind)
    before = _codes(quantized)
    svk.inject(quantized, _cfg(method))
    svk.inject(twin, _cfg(method))
    layers = adapted_layers(quantized)
    assert layers and all(isinstance(layer, quantized_class(METHODS[method]))
                          for layer in layers.values())
    _perturb_alike(quantized, twin)
    tol = max(1e-5, 4 * e0)

    out_q, out_t = quantized(IDS, labels=IDS), twin(IDS, labels=IDS)
    assert (out_q.logits - out_t.logits).abs().max().item() <= tol
    out_q.loss.backward()
    out_t.loss.backward()
    grads_q, grads_t = _trainable_grads(quantized), _trainable_grads(twin)
    assert grads_q.keys() == grads_t.keys() and grads_q
    for name in grads_q:
        assert (grads_q[name] - grads_t[name]).abs().max().item() <= tol, name

    # Only adapter tensors get gradients; nothing of the base does.
    adapter = {f"{ln}.{tn}" for ln, layer in layers.items()
               for tn, p in layer.adapter_tensors().items() if p.requires_grad}
    with_grad = {n for n, p in quantized.named_parameters() if p.grad is not None}
    assert with_grad == adapter

    # A training step leaves the codes (and their scales) bit for bit as they were, and no
    # layer keeps a dense (out, in) copy of its base.
    torch.optim.AdamW([p for p in quantized.parameters() if p.requires_grad], lr=1e-2).step()
    after = _codes(quantized)
    assert before.keys() == after.keys() and before
    for name in before:
        assert all(torch.equal(x, y) for x, y in zip(before[name], after[name])), name
    for layer in layers.values():
        # (the layer's own tensors: base_layer's torchao weight reports a float dtype)
        shapes = [tuple(t.shape) for t in (*layer.parameters(recurse=False),
                                           *layer.buffers(recurse=False))]
        assert (layer.out_features, layer.in_features) not in shapes


# ---- what each method does on a quantized base ------------------------------------------------
@pytest.mark.parametrize("method", ["pissa", "kasa"])
def test_rewriting_methods_keep_the_codes_and_subtract_the_removed_part(method):
    _require("nf4")
    quantized, _, _ = _bases("nf4")
    with torch.no_grad():
        base = quantized(IDS).logits
    svk.inject(quantized, _cfg(method))
    for layer in adapted_layers(quantized).values():
        assert layer.base_removed_b is not None
        # weight is the effective (residual) base; original_weight the dequantized codes
        expected = dequantize(layer.base_layer) - layer.base_removed_b @ layer.base_removed_a
        torch.testing.assert_close(layer.weight, expected, rtol=0, atol=1e-6)
        assert torch.equal(layer.original_weight(), dequantize(layer.base_layer))
    with torch.no_grad():
        adapted = quantized(IDS).logits
    if method == "pissa":
        # PiSSA's adapter starts as exactly the removed part: the model is the base at init
        # (up to fp32 rounding of the two rank-r terms).
        assert (adapted - base).abs().max().item() <= 1e-5
    with svk.disable_adapter(quantized), torch.no_grad():
        assert torch.equal(quantized(IDS).logits, base)


def test_merge_refuses_and_unload_gives_the_quantized_layers_back():
    _require("int8")
    quantized, _, _ = _bases("int8")
    originals = {name: m for name, m in quantized.named_modules() if is_quantized(m)}
    svk.inject(quantized, _cfg("lora"))
    _perturb_alike(quantized)
    layer = next(iter(adapted_layers(quantized).values()))
    with pytest.raises(RuntimeError, match="requantize"):
        layer.merge()
    with pytest.raises(RuntimeError, match="cannot be merged"):
        svk.merge(quantized)
    with pytest.raises(ValueError, match="quantized base"):
        svk.unload(quantized, merge=True)
    assert adapted_layers(quantized)          # the refused unload changed nothing
    with svk.disable_adapter(quantized), torch.no_grad():
        base = quantized(IDS).logits
    svk.unload(quantized, merge=False)
    for name, module in originals.items():
        assert quantized.get_submodule(name) is module
    with torch.no_grad():
        assert torch.equal(quantized(IDS).logits, base)


def test_save_and_load_adapter_on_quantized_bases(tmp_path):
    _require("nf4")
    quantized, twin, e0 = _bases("nf4")
    svk.inject(quantized, _cfg("lora_xs"))
    _perturb_alike(quantized)
    path = tmp_path / "adapter.safetensors"
    svk.save_adapter(quantized, path)
    with torch.no_grad():
        expected = quantized(IDS).logits

    fresh, _, _ = _bases("nf4")
    svk.inject(fresh, _cfg("lora_xs"))
    svk.load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, expected)
    # The fingerprint is the dequantized weight's: the dense twin accepts the file too.
    svk.inject(twin, _cfg("lora_xs"))
    svk.load_adapter(twin, path)
    with torch.no_grad():
        assert (twin(IDS).logits - expected).abs().max().item() <= max(1e-5, 4 * e0)
    # Another base (other weights, same shapes) is refused by the fingerprint.
    other = _quantize(_tiny_llama(seed=3), "nf4")
    svk.inject(other, _cfg("lora_xs"))
    with pytest.raises(ValueError, match="trained on different base weights"):
        svk.load_adapter(other, path)


def test_export_peft_is_a_qlora_on_the_same_quantized_base(tmp_path):
    _require("nf4")
    peft = pytest.importorskip("peft")
    quantized, _, _ = _bases("nf4")
    base_copy = copy.deepcopy(quantized)
    svk.inject(quantized, _cfg("lora_xs"))
    _perturb_alike(quantized)
    svk.export_peft(quantized, tmp_path)
    with torch.no_grad():
        expected = quantized(IDS).logits
        # PEFT's model in train mode (dropout 0): in eval mode bitsandbytes would repack its
        # Linear4bit codes for AVX512-BF16 CPUs and compute in bf16 (see svk.nn.quantized).
        loaded = peft.PeftModel.from_pretrained(base_copy, str(tmp_path)).train()
        got = loaded(IDS).logits
    # PEFT adds B·A in its own order of fp32 operations: a few roundings of logits of size ~0.5.
    assert (got - expected).abs().max().item() <= 1e-5


def test_import_peft_reads_a_qlora_checkpoint_onto_the_quantized_base(tmp_path):
    _require("nf4")
    peft = pytest.importorskip("peft")
    quantized, _, _ = _bases("nf4")
    trained = copy.deepcopy(quantized)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    trained = peft.get_peft_model(trained, config)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    trained.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = trained.train()(IDS).logits      # train mode: as in the export test
    svk.import_peft(quantized, tmp_path)
    layers = adapted_layers(quantized)
    assert len(layers) == 6 and all(isinstance(layer, QuantizedSVLinear)
                                    for layer in layers.values())
    with torch.no_grad():
        assert (quantized(IDS).logits - expected).abs().max().item() <= 1e-5


def test_eval_mode_never_repacks_the_4bit_codes():
    """Regression: bitsandbytes 0.50.2 repacks a Linear4bit's codes in place for AVX512-BF16
    CPUs at an eval-mode no-grad forward (block scales rounded to bf16; then bf16 compute, a
    layout dequantize_4bit misreads, and no gradient to the input). svk keeps its bases out of
    that path: eval gives the train-mode outputs and leaves the codes as they were."""
    _require("nf4")
    quantized, _, _ = _bases("nf4")
    svk.inject(quantized, _cfg("lora"))
    _perturb_alike(quantized)
    before = _codes(quantized)
    with torch.no_grad():
        train_logits = quantized.train()(IDS).logits
        eval_logits = quantized.eval()(IDS).logits
    assert torch.equal(eval_logits, train_logits)
    after = _codes(quantized)
    assert all(torch.equal(x, y) for name in before for x, y in zip(before[name], after[name]))
    assert all(layer.base_layer.training and not layer.training
               for layer in adapted_layers(quantized).values())


def test_gradient_checkpointing_gives_the_same_gradients():
    _require("nf4")
    plain, _, _ = _bases("nf4")
    checkpointed = copy.deepcopy(plain)
    for model in (plain, checkpointed):
        svk.inject(model, _cfg("sara"))
        model.train()
    _perturb_alike(plain, checkpointed)
    checkpointed.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False})
    plain(IDS, labels=IDS).loss.backward()
    checkpointed(IDS, labels=IDS).loss.backward()
    grads, again = _trainable_grads(plain), _trainable_grads(checkpointed)
    for name in grads:
        # recomputation runs the same ops on the same inputs: equal up to fp32 reassociation
        torch.testing.assert_close(again[name], grads[name], rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", ["nf4", "torchao"])
def test_autocast_bf16_trains_and_stays_close_to_fp32(kind):
    _require(kind)
    quantized, _, _ = _bases(kind)
    svk.inject(quantized, _cfg("lora"))
    _perturb_alike(quantized)
    with torch.no_grad():
        reference = quantized(IDS).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantized(IDS, labels=IDS)
    out.loss.backward()
    grads = _trainable_grads(quantized)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # bf16 has 8 bits of mantissa (u = 2⁻⁹ ≈ 2e-3); a 2-layer model's logits of size ~0.5
    # after a handful of bf16 GEMMs deviate by a few u relative: 3e-2 absolute is ~10 u.
    assert (out.logits.float() - reference).abs().max().item() <= 3e-2


def test_mosara_records_gates_on_a_quantized_base():
    _require("int8")
    quantized, _, _ = _bases("int8")
    svk.inject(quantized, _cfg("mosara"))
    layer = next(iter(adapted_layers(quantized).values()))
    layer.record_gates = True
    with torch.no_grad():
        quantized(IDS)
    assert layer.last_gates.shape == (layer.heads,)
    torch.testing.assert_close(layer.last_gates.sum(), torch.tensor(1.0))


def test_from_linear_and_clear_refusals():
    _require("int8")
    import bitsandbytes as bnb
    dense = nn.Linear(64, 32)
    q = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=0.0)
    q.load_state_dict(dense.state_dict())
    # Not moved to a device yet: bitsandbytes has not quantized it.
    with pytest.raises(TypeError, match="no quantized weight yet"):
        quantized_class(METHODS["lora_xs"]).from_linear(q)
    q = q.to("cpu")
    layer = quantized_class(METHODS["lora_xs"]).from_linear(q, rank=4)
    assert layer.base_layer is q and layer.rank == 4 and layer.bias is q.bias
    x = torch.randn(3, 64)
    with torch.no_grad():
        layer.core.zero_()                          # a zero update adds exactly 0
        assert torch.equal(layer(x), q(x))
    with pytest.raises(TypeError, match="needs a quantized base layer"):
        quantized_class(METHODS["lora"])(dense, a=torch.zeros(2, 64), b=torch.zeros(32, 2),
                                         s=torch.ones(2))
    with pytest.raises(AttributeError, match="cannot be assigned"):
        layer.weight = nn.Parameter(torch.zeros(32, 64))


# ---- the ops against float64 references -------------------------------------------------------
def _delta_inputs(seed=0, m=5, n_in=7, n_out=6, r=3, k=2):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
    return dict(x=rand(2, m, n_in), y_base=rand(2, m, n_out), a=rand(r, n_in), s=rand(r),
                b=rand(n_out, r), core=rand(r, r), out_scale=rand(n_out),
                removed_a=torch.randn(k, n_in, generator=g, dtype=torch.float64),
                removed_b=torch.randn(n_out, k, generator=g, dtype=torch.float64))


def test_sv_delta_matches_its_formula_and_gradchecks():
    t = _delta_inputs()
    y = sv_delta(t["x"], t["y_base"], t["a"], t["s"], t["b"], core=t["core"],
                 out_scale=t["out_scale"], scaling=0.7, removed_a=t["removed_a"],
                 removed_b=t["removed_b"])
    u = ((t["x"] @ t["a"].T) * t["s"]) @ t["core"].T
    ref = (t["y_base"] + 0.7 * (u @ t["b"].T) * t["out_scale"]
           - (t["x"] @ t["removed_a"].T) @ t["removed_b"].T)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)

    def f(x, y_base, a, s, b, core, out_scale):
        return sv_delta(x, y_base, a, s, b, core=core, out_scale=out_scale, scaling=0.7,
                        removed_a=t["removed_a"], removed_b=t["removed_b"])
    inputs = tuple(t[n] for n in ("x", "y_base", "a", "s", "b", "core", "out_scale"))
    assert torch.autograd.gradcheck(f, inputs)


def test_sv_mixture_delta_matches_eq5_per_head_and_gradchecks():
    g = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
    x, y_base, a, b = rand(4, 7), rand(4, 6), rand(3, 7), rand(6, 3)
    lambdas, gate_in, gate_out, out_scale = rand(5, 3), rand(3), rand(5), rand(6)
    y, gates = sv_mixture_delta(x, y_base, a, lambdas, gate_in, gate_out, b, out_scale=out_scale,
                                scaling=1.3, return_gates=True)
    t = x @ a.T
    weights = torch.softmax((t @ gate_in)[:, None] * gate_out, dim=-1)
    # Mo-SARA Eq. 5 the naive way: one (M, out) product per head, weighted by its gate.
    per_head = sum(weights[:, i:i + 1] * ((t * lambdas[i]) @ b.T) for i in range(5))
    torch.testing.assert_close(y, y_base + 1.3 * per_head * out_scale, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gates, weights.detach())
    assert torch.autograd.gradcheck(
        lambda *args: sv_mixture_delta(*args, out_scale=out_scale, scaling=1.3),
        (x, y_base, a, lambdas, gate_in, gate_out, b))


def test_ops_save_no_out_sized_tensor_and_x_only_when_a_trains():
    m, n_in, n_out, r = 11, 7, 13, 3
    for a_trains in (False, True):
        x = torch.randn(m, n_in, requires_grad=True)
        y_base = torch.randn(m, n_out, requires_grad=True)
        a = torch.randn(r, n_in, requires_grad=a_trains)
        s, b = torch.randn(r, requires_grad=True), torch.randn(n_out, r)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            sv_delta_op.full(x, y_base, a, s, b, None, None, None, None, 1.0)
        assert (m, n_out) not in saved
        assert ((m, n_in) in saved) == a_trains


def test_custom_ops_pass_opcheck():
    t = _delta_inputs()
    args = (t["x"].detach().reshape(-1, 7).float().requires_grad_(),
            t["y_base"].detach().reshape(-1, 6).float().requires_grad_(),
            t["a"].detach().float().requires_grad_(), t["s"].detach().float().requires_grad_(),
            t["b"].detach().float().requires_grad_(), None, None,
            t["removed_a"].float(), t["removed_b"].float(), 0.5)
    torch.library.opcheck(sv_delta_op.custom_op, args)
    g = torch.Generator().manual_seed(2)
    mix = (torch.randn(4, 7, generator=g, requires_grad=True),
           torch.randn(4, 6, generator=g, requires_grad=True),
           torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g, requires_grad=True),
           torch.randn(3, generator=g, requires_grad=True),
           torch.randn(5, generator=g, requires_grad=True),
           torch.randn(6, 3, generator=g), torch.randn(6, generator=g, requires_grad=True), 1.0)
    torch.library.opcheck(sv_mixture_delta_op.custom_op, mix)


def test_sv_delta_refuses_bad_shapes_by_name():
    t = _delta_inputs()
    with pytest.raises(ValueError, match="y_base"):
        sv_delta(t["x"], t["y_base"][:1], t["a"], t["s"], t["b"])
    with pytest.raises(ValueError, match="b must have shape"):
        sv_delta(t["x"], t["y_base"], t["a"], t["s"], t["b"][:, :2])
    with pytest.raises(ValueError, match="go together"):
        sv_delta(t["x"], t["y_base"], t["a"], t["s"], t["b"], removed_a=t["removed_a"])


@pytest.mark.parametrize("kind,method", [("torchao", "lora"), ("torchao", "mosara"),
                                         ("torchao", "pissa"), ("nf4", "lora")])
def test_compiled_layer_matches_eager(kind, method):
    """torch.compile traces svk::sv_delta / svk::sv_mixture_delta (custom ops). Regression:
    their autograd formula once dropped y_base's gradient, so compiled training lost the
    base layer's share of dx (adapter gradients and outputs were still right)."""
    _require(kind)
    quantized, _, _ = _bases(kind)
    base = quantized.model.layers[0].mlp.up_proj
    layer = quantized_class(METHODS[method]).from_linear(
        base, generator=torch.Generator().manual_seed(0), **({"rank": 4} if method != "mosara"
                                                               else {}))
    _perturb_alike(layer)
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    eager = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    eager_dx = x.grad.clone()
    layer.zero_grad()
    x.grad = None
    compiled = torch.compile(layer, backend="aot_eager")
    yc = compiled(x)
    yc.square().sum().backward()
    # The same PyTorch ops in the same order, traced: equal up to fp32 reassociation.
    torch.testing.assert_close(yc, y, rtol=0, atol=1e-6)
    torch.testing.assert_close(x.grad, eager_dx, rtol=0, atol=1e-6)
    for name, p in layer.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, eager[name], rtol=0, atol=1e-6)


def test_dropout_applies_to_the_adapter_input_only():
    # torchao: a base whose output does not depend on train/eval (bitsandbytes' int8 layer
    # quantizes its input in eval mode on CPU, so its output changes with the mode)
    _require("torchao")
    quantized, _, _ = _bases("torchao")
    base = quantized.model.layers[0].self_attn.q_proj
    try:
        layer = quantized_class(METHODS["lora"]).from_linear(base, rank=4, dropout=0.5)
    except TypeError as error:               # an svk without adapter dropout
        pytest.skip(f"adapter dropout unavailable: {error}")
    _perturb_alike(layer)
    x = torch.randn(3, 64)
    with torch.no_grad():
        y_base = base(x)
        delta = lambda inp: layer.scaling * (inp @ layer.a.T) @ layer.b.T  # noqa: E731
        layer.eval()
        torch.testing.assert_close(layer(x), y_base + delta(x), rtol=0, atol=1e-6)
        layer.train()
        torch.manual_seed(7)
        y = layer(x)
        torch.manual_seed(7)
        kept = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
        # the base sees x; the adapter sees the dropped, rescaled x (torch's dropout)
        torch.testing.assert_close(y, y_base + delta(x * kept), rtol=0, atol=1e-6)


def test_parameter_counts_count_4bit_weights_not_bytes():
    _require("nf4")
    quantized, twin, _ = _bases("nf4")
    svk.inject(quantized, _cfg("lora"))
    svk.inject(twin, _cfg("lora"))
    count, dense = svk.print_trainable_parameters(quantized), svk.print_trainable_parameters(twin)
    assert count.trainable == dense.trainable > 0
    # The same model: a 4-bit layer holds out·in weights in out·in/2 bytes.
    assert count.total == dense.total


@pytest.mark.parametrize("kind", ["int8", "torchao"])
def test_eval_mode_matches_the_twin_within_the_bases_own_eval_deviation(kind):
    """In eval mode bitsandbytes' Linear8bitLt on CPU also quantizes its input (int8 per row),
    so its base deviates from the dequantized twin by more than in training mode (measured
    e0 4.5e-3 vs 1.8e-7 on this model); the adapter adds nothing to that: the adapted models
    stay within max(1e-5, 4·e0) of each other, e0 measured in eval mode here."""
    _require(kind)
    quantized, twin, _ = _bases(kind)
    quantized.eval()
    twin.eval()
    with torch.no_grad():
        e0 = (quantized(IDS).logits - twin(IDS).logits).abs().max().item()
    svk.inject(quantized, _cfg("lora_xs"))
    svk.inject(twin, _cfg("lora_xs"))
    _perturb_alike(quantized, twin)
    quantized.eval()
    twin.eval()
    with torch.no_grad():
        gap = (quantized(IDS).logits - twin(IDS).logits).abs().max().item()
    assert gap <= max(1e-5, 4 * e0)


@pytest.mark.parametrize("kind", ["int8", "nf4", "torchao"])
@pytest.mark.parametrize("method", ["lora", "lora_xs"])
def test_from_linear_on_a_quantized_layer_gives_the_quantized_variant(kind, method):
    """Method.from_linear(quantized layer) used to fail ("Only Tensors of floating point …
    can require gradients" / "W must have a floating dtype … uint8")."""
    _require(kind)
    model = _quantize(torch.nn.Sequential(torch.nn.Linear(32, 24)), kind)
    layer = METHODS[method].from_linear(model[0], rank=4)
    assert isinstance(layer, QuantizedSVLinear) and isinstance(layer, METHODS[method])
    x = torch.randn(3, 32)
    # The update starts near 0 (LoRA: b = 0; LoRA-XS: core ~ N(0, 1e-5²) times S and scaling).
    assert torch.allclose(layer(x), model[0](x), atol=1e-3)


def test_forward_mode_ad_is_refused_not_zero():
    """No tensor requires grad under torch.func.jvp: the op must still go through its
    Function (whose jvp refuses) rather than return a zero tangent. (bitsandbytes' own
    Function refuses functorch transforms before svk's op is reached, so the op is called
    directly.)"""
    g = torch.Generator().manual_seed(0)
    y_base, a, s, b = (torch.randn(3, 6, generator=g), torch.randn(4, 5, generator=g),
                       torch.rand(4, generator=g), torch.randn(6, 4, generator=g))
    x = torch.randn(3, 5, generator=g)
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jvp(lambda v: sv_delta(v, y_base, a, s, b), (x,), (torch.randn_like(x),))
