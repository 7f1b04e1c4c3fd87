"""Adapter dropout (issue 16 item 4): t = dropout(x)·aᵀ, the base GEMM sees x, the mask comes
from a seed and is regenerated in backward, never stored. The PyTorch path (torch.Generator
from the seed) first, then the Triton path (Philox in the kernels from (seed, row·in + col)),
which runs under the interpreter on CPU and compiled on a GPU."""
import pytest
import torch

import svk
from svk import kernels
from svk.kernels import x_at_router as router_module
from svk.kernels._common import LAUNCHES
from svk.kernels.dropout import dropped_input
from svk.ops import _dispatch
from svk.ops._common import draw_seed, dropout_keep
from svk.ops.sv_mixture_linear import _router
from tests.utils import DEVICE, rel_err, set_env

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


# ---- the Triton path: the mask drawn in-kernel (Philox), regenerated in backward -----------

# Odd sizes: partial row, column and K tiles; the rank below one tile and the padded rank.
M_T, IN_T, OUT_T, R_T = 9, 37, 21, 5
STRATEGIES = ["fused", "one_pass"]
DTYPES = [torch.float32, torch.float16]
# Relative Frobenius error against float64 with the same mask: a few units of the dtype's
# rounding (fp32 ε = 1.2e-7, fp16 ε = 9.8e-4) times the √K growth of K ≤ 37-long fp32 dot
# products, plus one rounding of the output to the dtype (tests/utils.FLOOR, with room for
# the 1/(1 − p) scale and the separate dx accumulator).
TOL = {torch.float32: 5e-5, torch.float16: 8e-3}


def _mask(shape, p, seed):
    """The kernels' 0/1 keep mask for (p, seed), from the materialising kernel."""
    return dropped_input(torch.ones(shape, device=DEVICE), p, seed).double()


def _seed_of(call_seed):
    """The seed an op call draws after torch.manual_seed(call_seed)."""
    torch.manual_seed(call_seed)
    return draw_seed()


def _sv_inputs(dtype, core=True):
    g = torch.Generator().manual_seed(1)

    def leaf(*shape, scale=1.0, dt=torch.float32):
        return (torch.randn(shape, generator=g) * scale).to(DEVICE, dt).requires_grad_()
    return dict(x=leaf(M_T, IN_T, dt=dtype), weight=leaf(OUT_T, IN_T, scale=IN_T ** -0.5,
                                                         dt=dtype).detach(),
                a=leaf(R_T, IN_T, scale=IN_T ** -0.5), s=leaf(R_T), b=leaf(OUT_T, R_T),
                bias=leaf(OUT_T, dt=dtype).detach(),
                core=leaf(R_T, R_T, scale=R_T ** -0.5) if core else None)


def _sv_call(inp, p, call_seed, backend="triton"):
    torch.manual_seed(call_seed)
    return svk.sv_linear(inp["x"], inp["weight"], inp["a"], inp["s"], inp["b"],
                         bias=inp["bias"], core=inp["core"], scaling=0.7, backend=backend,
                         dropout=p)


def _sv_reference(inp, keep, p):
    """float64 sv_linear with the adapter input x ⊙ keep/(1 − p), differentiable."""
    d = {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None)
         for k, v in inp.items()}
    x = d["x"]
    t = torch.nn.functional.linear(x * keep / (1 - p), d["a"]) * d["s"]
    if d["core"] is not None:
        t = t @ d["core"].t()
    y = torch.nn.functional.linear(x, d["weight"], d["bias"]) + 0.7 * t @ d["b"].t()
    return y, d


@pytest.fixture
def strategy(request, monkeypatch):
    set_env(monkeypatch, "SVK_STRATEGY", request.param)
    yield request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strategy", STRATEGIES, indirect=True)
def test_triton_forward_and_backward_use_the_kernels_mask(strategy, dtype):
    """y and every gradient against float64 with the mask the kernels draw (materialised by
    dropped_input): the forward's in-kernel mask (x_at / one pass) and the backward's (dx's
    GEMM kernel, da's dropped x) are the same one."""
    inp = _sv_inputs(dtype)
    p = 0.4
    before = LAUNCHES.copy()
    y = _sv_call(inp, p, 7)
    launched = LAUNCHES - before
    assert launched["xw_plus_xasb" if strategy == "one_pass" else "x_at"] == 1, launched
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    wanted = [inp[k] for k in ("x", "a", "s", "b", "core")]
    got = torch.autograd.grad(y, wanted, dy)
    keep = _mask((M_T, IN_T), p, _seed_of(7))
    assert 0 < keep.sum() < keep.numel()
    y64, d = _sv_reference(inp, keep, p)
    ref = torch.autograd.grad(y64, [d[k] for k in ("x", "a", "s", "b", "core")], dy.double())
    assert rel_err(y, y64) < TOL[dtype]
    for name, g, r in zip(("x", "a", "s", "b", "core"), got, ref):
        assert rel_err(g, r) < TOL[dtype], name
    # Another seed's mask is far from this call (the comparison above can tell masks apart).
    other = _mask((M_T, IN_T), p, _seed_of(8))
    assert rel_err(y, _sv_reference(inp, other, p)[0]) > 0.1


@pytest.mark.parametrize("strategy", STRATEGIES, indirect=True)
def test_triton_seeded_calls_are_deterministic(strategy):
    inp = _sv_inputs(torch.float32)
    outs = []
    for _ in range(2):
        y = _sv_call(inp, 0.3, 11)
        outs.append((y,) + torch.autograd.grad(y.sum(), [inp["x"], inp["a"], inp["s"]]))
    for first, second in zip(*outs):
        assert torch.equal(first, second)
    assert not torch.equal(outs[0][0], _sv_call(inp, 0.3, 12))


@pytest.mark.parametrize("strategy", STRATEGIES + ["merged"], indirect=True)
def test_triton_dropout_zero_is_the_plain_kernels_bit_for_bit(strategy):
    """dropout=0 launches the kernels with DROPOUT off: the same bits as a call without it,
    forward and backward, and as the kernels called directly."""
    inp = _sv_inputs(torch.float32)
    y0 = svk.sv_linear(inp["x"], inp["weight"], inp["a"], inp["s"], inp["b"], bias=inp["bias"],
                       core=inp["core"], scaling=0.7, backend="triton")
    g0 = torch.autograd.grad(y0.sum(), [inp["x"], inp["a"]])
    y1 = _sv_call(inp, 0.0, 3)
    g1 = torch.autograd.grad(y1.sum(), [inp["x"], inp["a"]])
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    t, _ = kernels.x_at(inp["x"].detach(), inp["a"].detach())
    assert torch.equal(t, kernels.x_at(inp["x"].detach(), inp["a"].detach(), dropout=0.0,
                                       seed=12345)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_kernel_draws_the_same_mask(dtype):
    """With a = identity, t = x·aᵀ is dropout(x) itself, so each kernel's in-kernel mask can be
    read off: x_at, the one-pass kernel, the router with t fused or from x_at, and the
    backward's dx kernel (dt·a with a = I is dt, masked) agree with dropped_input."""
    k = 24                                    # a ≤ 128 wide, as one pass needs
    x = torch.randn(M_T, k).to(DEVICE, dtype)
    eye = torch.eye(k, device=DEVICE)
    p, seed = 0.5, _seed_of(4)
    expected = x.double() * _mask((M_T, k), p, seed) / (1 - p)
    assert torch.equal(dropped_input(x, p, seed).double() != 0, expected != 0)
    t_at, _ = kernels.x_at(x, eye, dropout=p, seed=seed)
    _, t_one = kernels.xw_plus_xasb(x, torch.zeros(3, k, device=DEVICE, dtype=dtype), eye,
                                    torch.zeros(3, k, device=DEVICE), dropout=p, seed=seed)
    heads = torch.zeros(2, device=DEVICE)
    lambdas = torch.ones(2, k, device=DEVICE)
    t_fused, _, _ = router_module.x_at_router(x, eye, torch.zeros(k, device=DEVICE), heads,
                                              lambdas, fuse_t=True, dropout=p, seed=seed)
    t_split, _, _ = router_module.x_at_router(x, eye, torch.zeros(k, device=DEVICE), heads,
                                              lambdas, fuse_t=False, dropout=p, seed=seed)
    dt = x.float()
    dx = kernels.xw_plus_ub(torch.zeros(M_T, 3, device=DEVICE, dtype=dtype),
                            torch.zeros(3, k, device=DEVICE, dtype=dtype), dt, eye,
                            w_transposed=True, v_transposed=True, dropout=p, seed=seed)
    # x ⊙ keep is exact; only the 1/(1 − p) = 2 scale and (dx) the rounding to dtype remain.
    for name, t in (("x_at", t_at), ("one_pass", t_one), ("router fused", t_fused),
                    ("router split", t_split), ("dx", dx)):
        assert torch.equal(t.double() != 0, expected != 0), name
        torch.testing.assert_close(t.double(), expected, rtol=1e-3 if dtype != torch.float32
                                   else 1e-6, atol=0, msg=name)


def test_kernel_mask_statistics():
    """The kernels' mask keeps each element with probability 1 − p, whatever its column mod 4
    (each Philox call serves four neighbouring columns) and independently of its neighbour;
    different seeds give different masks, and the mean of t over many seeds is x·aᵀ."""
    p, rows, cols = 0.3, 203, 301                # 61k draws: one standard error ≈ 0.0019
    keep = _mask((rows, cols), p, _seed_of(0))
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    for lane in range(4):
        lane_keep = keep[:, lane::4]
        sigma = (p * (1 - p) / lane_keep.numel()) ** 0.5
        assert abs(lane_keep.mean().item() - (1 - p)) < 5 * sigma, lane
    # Neighbouring columns (same Philox call for three pairs out of four) and rows:
    # P(both kept) = (1 − p)² for independent draws.
    for both in (keep[:, 1:] * keep[:, :-1], keep[1:] * keep[:-1]):
        sigma = ((1 - p) ** 2 * (1 - (1 - p) ** 2) / both.numel()) ** 0.5
        assert abs(both.mean().item() - (1 - p) ** 2) < 5 * sigma
    assert not torch.equal(keep, _mask((rows, cols), p, _seed_of(1)))
    x = torch.randn(3, 16, device=DEVICE)
    a = torch.randn(2, 16, device=DEVICE)
    draws = torch.stack([kernels.x_at(x, a, dropout=0.5, seed=seed)[0] for seed in range(400)])
    stderr = draws.std(0) / 400 ** 0.5
    assert ((draws.mean(0) - kernels.x_at(x, a)[0]).abs() <= 5 * stderr).all()


@pytest.mark.parametrize("strategy", STRATEGIES, indirect=True)
def test_triton_base_path_is_never_dropped(strategy):
    inp = _sv_inputs(torch.float32)
    with torch.no_grad():
        inp["b"].zero_()
    y = _sv_call(inp, 0.6, 5)
    base = kernels.xw_plus_ub(inp["x"].detach(), inp["weight"], bias=inp["bias"])
    assert torch.equal(y, base)
    dx, = torch.autograd.grad(y.sum(), [inp["x"]])
    torch.testing.assert_close(dx, torch.ones_like(y) @ inp["weight"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES, indirect=True)
def test_triton_finite_differences_fp32(strategy):
    """Central differences in fp32 (the interpreter has no fp64 kernels) with the seed fixed
    before every call, so each evaluation uses the same mask. Step 1e-2 on O(1) inputs: the
    op is linear in x and a (the truncation error is zero) and bilinear elsewhere, so the
    differences carry only fp32 rounding (~1e-7·|y|/h ≈ 1e-5 relative): 1e-3 is loose."""
    inp = _sv_inputs(torch.float32, core=False)
    names = ("x", "a", "s", "b")

    def f(*leaves):
        torch.manual_seed(21)
        return svk.sv_linear(leaves[0], inp["weight"], leaves[1], leaves[2], leaves[3],
                             bias=inp["bias"], scaling=0.7, backend="triton", dropout=0.35)
    leaves = [inp[k] for k in names]
    direction = torch.randn(M_T, OUT_T, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    grads_ = torch.autograd.grad((f(*leaves) * direction).sum(), leaves)
    h = 1e-2
    for i, name in enumerate(names):
        v = torch.randn(leaves[i].shape, generator=torch.Generator().manual_seed(10 + i))
        v = v.to(DEVICE)
        with torch.no_grad():
            plus = [t + h * v if j == i else t for j, t in enumerate(leaves)]
            minus = [t - h * v if j == i else t for j, t in enumerate(leaves)]
            numeric = ((f(*plus) - f(*minus)) * direction).sum() / (2 * h)
        analytic = (grads_[i] * v).sum()
        assert abs(numeric - analytic) <= 1e-3 * max(1.0, abs(analytic)), name


@pytest.mark.parametrize("strategy", STRATEGIES, indirect=True)
def test_triton_expectation_matches_dropout_zero(strategy):
    """Every row draws its own mask, so one call on a row repeated N times gives N samples of
    the dropped adapter output for that row; their mean is the undropped one."""
    inp = _sv_inputs(torch.float32)
    n = 2048
    x = inp["x"].detach()[:2].repeat_interleave(n, 0)
    with torch.no_grad():
        def adapter(p):
            torch.manual_seed(1)
            y = svk.sv_linear(x, inp["weight"], inp["a"], inp["s"], inp["b"], bias=inp["bias"],
                              core=inp["core"], scaling=0.7, backend="triton", dropout=p)
            return (y - kernels.xw_plus_ub(x, inp["weight"], bias=inp["bias"])).view(2, n, -1)
        samples = adapter(0.25)
        exact = adapter(0.0)[:, 0]
    mean = samples.mean(1)
    stderr = samples.std(1) / n ** 0.5
    # Inverted dropout is unbiased: the mean of N draws lies within a few standard errors.
    assert ((mean - exact).abs() <= 5 * stderr + 1e-6).all()
    assert (stderr > 0).all()


@pytest.mark.parametrize("strategy", STRATEGIES, indirect=True)
def test_triton_saves_no_mask_for_backward(strategy):
    def saved_bytes(p):
        inp = _sv_inputs(torch.float32)
        total = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: total.append(t.numel() * t.element_size()) or t, lambda t: t):
            _sv_call(inp, p, 1)
        return sum(total)
    assert saved_bytes(0.3) == saved_bytes(0.0)


def test_dropout_routes_merged_to_fused(monkeypatch):
    """merged folds the adapter into the base weight, which sees x: a dropout call forced to
    merged runs fused (the same seed gives the fused call's bits); without dropout merged
    still runs."""
    inp = _sv_inputs(torch.float32)
    set_env(monkeypatch, "SVK_STRATEGY", "fused")
    y_fused = _sv_call(inp, 0.2, 9)
    set_env(monkeypatch, "SVK_STRATEGY", "merged")
    before = LAUNCHES.copy()
    y = _sv_call(inp, 0.2, 9)
    assert torch.equal(y, y_fused)
    assert (LAUNCHES - before)["x_at"] == 1
    assert _dispatch.dropout_strategy("merged") == "fused"
    assert _dispatch.dropout_strategy("one_pass") == "one_pass"


def test_triton_layer_with_dropout_runs_the_kernels():
    """A layer forced onto the Triton backend trains with dropout in the kernels (it raised
    NotImplementedError before the kernels drew masks)."""
    layer = _layer("sara", dropout=0.2).train().to(DEVICE)
    layer.backend = "triton"
    before = LAUNCHES.copy()
    x = torch.randn(3, D_IN, device=DEVICE)
    torch.manual_seed(2)
    y = layer(x)
    y.sum().backward()
    launched = LAUNCHES - before
    assert launched["x_at"] + launched["xw_plus_xasb"] >= 1
    torch.manual_seed(2)
    assert torch.equal(layer(x), y)


@pytest.mark.parametrize("fuse_t", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_mixture_uses_the_kernels_mask(monkeypatch, fuse_t, dtype):
    """Mo-SARA on the Triton path (t in the router kernel, or from x_at): y and gradients
    against float64 with the kernels' mask."""
    monkeypatch.setattr(router_module, "_fuse_t_by_default", lambda x: fuse_t)
    g = torch.Generator().manual_seed(6)
    heads = 3

    def leaf(*shape, scale=1.0, dt=torch.float32, grad=True):
        return (torch.randn(shape, generator=g) * scale).to(DEVICE, dt).requires_grad_(grad)
    x = leaf(M_T, IN_T, dt=dtype)
    weight = leaf(OUT_T, IN_T, scale=IN_T ** -0.5, dt=dtype, grad=False)
    a = leaf(R_T, IN_T, scale=IN_T ** -0.5)
    lambdas, gate_in, gate_out = leaf(heads, R_T), leaf(R_T), leaf(heads)
    b = leaf(OUT_T, R_T, scale=R_T ** -0.5, grad=False)
    p = 0.3
    torch.manual_seed(13)
    y = svk.sv_mixture_linear(x, weight, a, lambdas, gate_in, gate_out, b, backend="triton",
                              dropout=p)
    leaves = [x, a, lambdas, gate_in, gate_out]
    got = torch.autograd.grad(y.sum(), leaves)
    keep = _mask((M_T, IN_T), p, _seed_of(13))
    d = [t.detach().double().requires_grad_() for t in leaves]
    t = torch.nn.functional.linear(d[0] * keep / (1 - p), d[1])
    _, u = _router(t, d[3], d[4], d[2])
    y64 = d[0] @ weight.double().t() + u @ b.double().t()
    ref = torch.autograd.grad(y64.sum(), d)
    assert rel_err(y, y64) < TOL[dtype]
    for name, gi, ri in zip(("x", "a", "lambdas", "gate_in", "gate_out"), got, ref):
        # The router's gradients are sums of softmax-Jacobian differences (see
        # test_sv_mixture_linear's FLOOR): 4× the dtype tolerance.
        assert rel_err(gi, ri) < 4 * TOL[dtype], name
