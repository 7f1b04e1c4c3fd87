"""Adapter dropout (issue 16 item 4): t = dropout(x)·aᵀ, the base GEMM sees x, the mask comes
from a seed and is regenerated in backward, never stored."""
import pytest
import torch

import svk
from svk.ops._common import draw_seed, dropout_keep

D_IN, D_OUT, R = 12, 10, 4


def _layer(method="sara", dropout=0.0, dtype=torch.float32):
    torch.manual_seed(0)
    linear = torch.nn.Linear(D_IN, D_OUT).to(dtype)
    kw = {"tau": 0.5} if method in ("sara", "mosara") else {"rank": R}
    layer = svk.nn.METHODS[method].from_linear(linear, dropout=dropout, **kw)
    with torch.no_grad():                 # a non-zero adapter (SARA starts with s = 0)
        for p in layer.adapter_tensors().values():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return layer


def _expected(layer, x, p, seed):
    """The layer's output with the mask a call seeded this way draws, from plain torch."""
    torch.manual_seed(seed)
    keep = dropout_keep(x.shape, x, p, draw_seed())
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    return base + torch.nn.functional.linear(x * keep, layer.delta_weight().to(x.dtype))


@pytest.mark.parametrize("method", ["sara", "lora_xs", "kasa", "lora"])
def test_dropout_zero_is_the_plain_op_bit_for_bit(method):
    layer = _layer(method, dropout=0.0).train()
    x = torch.randn(3, 5, D_IN)
    plain = svk.sv_linear(x, layer.weight, layer.a, layer.s, layer.b, bias=layer.bias,
                          core=layer.core, scaling=layer.scaling)
    assert torch.equal(layer(x), plain)


def test_eval_mode_is_deterministic_and_equals_dropout_zero():
    layer = _layer(dropout=0.4).eval()
    plain = _layer(dropout=0.0).eval()
    x = torch.randn(6, D_IN)
    assert torch.equal(layer(x), layer(x))
    assert torch.equal(layer(x), plain(x))


@pytest.mark.parametrize("method", ["sara", "lora_xs", "mosara"])
def test_train_mode_drops_the_adapter_input_only(method):
    layer = _layer(method, dropout=0.5).train()
    x = torch.randn(7, D_IN)
    if method == "mosara":
        # The router is non-linear: compare with dropout applied by hand to its input.
        torch.manual_seed(3)
        y = layer(x)
        torch.manual_seed(3)
        keep = dropout_keep(x.shape, x, 0.5, draw_seed())
        ref = svk.reference.sv_mixture_linear(x, layer.weight, layer.a, layer.lambdas,
                                              layer.gate_in, layer.gate_out, layer.b,
                                              bias=layer.bias, out_scale=layer.out_scale)
        base = torch.nn.functional.linear(x, layer.weight, layer.bias)
        dropped = svk.reference.sv_mixture_linear(x * keep, layer.weight, layer.a,
                                                  layer.lambdas, layer.gate_in, layer.gate_out,
                                                  layer.b, out_scale=layer.out_scale)
        dropped = dropped - torch.nn.functional.linear(x * keep, layer.weight)
        torch.testing.assert_close(y, base + dropped, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(y, ref)
        return
    torch.manual_seed(3)
    y = layer(x)
    torch.testing.assert_close(y, _expected(layer, x, 0.5, 3), rtol=1e-5, atol=1e-5)
    # The base path is never dropped: with a zero adapter the output is the base layer's.
    with torch.no_grad():
        layer.b.zero_()
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_seeded_calls_are_deterministic_and_gradcheck():
    layer = _layer("sara", dropout=0.3).double().train()
    x = torch.randn(5, D_IN, dtype=torch.float64, requires_grad=True)

    def f(x, a, s, b):
        torch.manual_seed(11)
        return svk.sv_linear(x, layer.weight, a, s, b, bias=layer.bias, scaling=layer.scaling,
                             dropout=0.3)
    args = (x, layer.a.detach().requires_grad_(), layer.s.detach().requires_grad_(),
            layer.b.detach().requires_grad_())
    assert torch.equal(f(*args), f(*args))
    assert torch.autograd.gradcheck(f, args)


def test_backward_regenerates_the_forward_mask():
    """Gradients of x and a against the hand-written masked formula (same seed)."""
    layer = _layer("sara", dropout=0.5).train()
    x = torch.randn(9, D_IN, requires_grad=True)
    torch.manual_seed(5)
    y = layer(x)
    dy = torch.randn_like(y)
    gx, ga = torch.autograd.grad(y, (x, layer.a), dy)
    x2 = x.detach().requires_grad_()
    a2 = layer.a.detach().requires_grad_()
    torch.manual_seed(5)
    keep = dropout_keep(x.shape, x, 0.5, draw_seed())
    t = torch.nn.functional.linear(x2 * keep, a2) * layer.s
    y2 = torch.nn.functional.linear(x2, layer.weight, layer.bias) + torch.nn.functional.linear(
        t, layer.b) * layer.scaling
    gx2, ga2 = torch.autograd.grad(y2, (x2, a2), dy)
    torch.testing.assert_close(gx, gx2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, ga2, rtol=1e-5, atol=1e-6)


def test_no_mask_is_saved_for_backward():
    """Bytes saved with dropout equal bytes saved without it (the mask is regenerated)."""
    def saved_bytes(p):
        layer = _layer("sara", dropout=p).train()
        x = torch.randn(64, D_IN, requires_grad=True)
        total = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: total.append(t.numel() * t.element_size()) or t, lambda t: t):
            layer(x)
        return sum(total)
    assert saved_bytes(0.3) == saved_bytes(0.0)


def test_expectation_over_seeds_matches_dropout_zero():
    layer = _layer("lora_xs", dropout=0.25).train()
    x = torch.randn(4, D_IN)
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    with torch.no_grad():
        samples = torch.stack([layer(x) - base for _ in range(4000)])
        mean = samples.mean(0)
        exact = layer.eval()(x) - base
    # Inverted dropout is unbiased: the mean over N draws is within a few standard errors.
    stderr = samples.std(0) / 4000 ** 0.5
    assert ((mean - exact).abs() <= 5 * stderr + 1e-7).all()


def test_config_and_bad_values():
    cfg = svk.AdapterConfig(method="lora", rank=2, target_modules=["0"], dropout=0.05)
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, D_OUT))
    svk.inject(model, cfg)
    assert model[0].dropout == 0.05
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="dropout must be in"):
            svk.AdapterConfig(method="lora", target_modules=["0"], dropout=bad)
    with pytest.raises(TypeError, match="dropout must be a real number"):
        svk.nn.LoRALinear.from_linear(torch.nn.Linear(4, 4), dropout="0.1")


def test_triton_kernels_refuse_dropout_when_forced():
    layer = _layer("sara", dropout=0.2).train()
    layer.backend = "triton"
    with pytest.raises(NotImplementedError, match="dropout runs on the PyTorch path"):
        layer(torch.randn(3, D_IN))
