"""sv_mixture_linear (Mo-SARA) against the float64 per-head oracle (Eq. 5 written literally):
forward, every gradient, the gates, the x_at_router kernel directly, memory saved for backward,
dispatch and bad input. Tests follow the device: CUDA tensors and compiled kernels where there
is a GPU, else CPU tensors with Triton under TRITON_INTERPRET=1 (tests/conftest.py)."""
import pytest
import torch

from svk import reference
from svk.kernels import x_at_router as router_module
from svk.kernels._common import LAUNCHES
from svk.kernels.x_at_router import x_at_router, x_at_router_backward
from svk.ops import _dispatch
from svk.ops.sv_mixture_linear import sv_mixture_linear
from tests.utils import set_env

NAMES = ("x", "weight", "a", "lambdas", "gate_in", "gate_out", "b", "bias", "out_scale")
MOSARA_TRAINABLE = ("lambdas", "gate_in", "gate_out", "out_scale")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter gets bf16 wrong (DESIGN.md §3): bf16 goes through the kernels on a GPU only.
KERNEL_DTYPES = [torch.float32, torch.float16] + (
    [torch.bfloat16] if DEVICE.type == "cuda" else [])

# Relative Frobenius error allowed against the float64 oracle, at least (flash-attention's
# rule below also allows twice what PyTorch itself makes in the same dtype). Each floor is a
# few units of the dtype's rounding (fp32 ε = 1.2e-7, fp16 ε = 9.8e-4, bf16 ε = 7.8e-3) times
# the √K growth of K-long fp32-accumulated dot products at these sizes (K ≤ 128): x, weight
# and the adapter products are rounded to the dtype once each, and the router's softmax passes
# t's rounding error on to g almost unchanged (|∂g/∂c| ≤ |gate_out|/2, c and gate_out O(1)),
# so the mixture adds no more than one further rounding. The gradients of gate_in/gate_out
# are sums over M of the softmax Jacobian's difference terms, the least well conditioned
# quantities here, which is why the same-dtype rule (not a fixed number) is the main bound.
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def rel_err(value, oracle):
    value, oracle = value.double(), oracle.double()
    if oracle.norm() == 0:
        return value.norm().item()  # exact zeros (m = 1 has no router gradient) stay exact
    return ((value - oracle).norm() / oracle.norm()).item()


def assert_close_to_oracle(value, oracle, same_dtype_value, dtype, name):
    err = rel_err(value, oracle)
    bound = max(2 * rel_err(same_dtype_value, oracle), FLOOR[dtype])
    assert err <= bound, f"{name}: relative error {err:.3g} > bound {bound:.3g} ({dtype})"


def make_inputs(lead=(2, 7), in_f=67, out_f=33, r=37, m=5, dtype=torch.float32,
                adapter_dtype=torch.float32, bias=True, out_scale=True, trainable=NAMES):
    """Fresh random tensors scaled so that t, the router's logits and y are all O(1). Base
    tensors in `dtype`, adapter tensors in `adapter_dtype` (fp32 adapters on a low-precision
    model, as training uses). out_scale is random, not Mo-SARA's zero init, so that every
    gradient is non-trivial."""
    spec = {
        "x": (lead + (in_f,), dtype, 1.0), "weight": ((out_f, in_f), dtype, in_f ** -0.5),
        "a": ((r, in_f), adapter_dtype, in_f ** -0.5), "lambdas": ((m, r), adapter_dtype, 1.0),
        "gate_in": ((r,), adapter_dtype, r ** -0.5), "gate_out": ((m,), adapter_dtype, 1.0),
        "b": ((out_f, r), adapter_dtype, r ** -0.5),
        "bias": ((out_f,), dtype, 1.0) if bias else None,
        "out_scale": ((out_f,), adapter_dtype, 1.0) if out_scale else None,
    }
    tensors = {}
    for name, item in spec.items():
        if item is None:
            tensors[name] = None
            continue
        shape, dt, scale = item
        value = (torch.randn(shape, dtype=torch.float64) * scale).to(DEVICE, dt)
        tensors[name] = value.requires_grad_(name in trainable)
    return tensors


def call(fn, t, scaling, **kw):
    return fn(t["x"], t["weight"], t["a"], t["lambdas"], t["gate_in"], t["gate_out"], t["b"],
              bias=t["bias"], out_scale=t["out_scale"], scaling=scaling, **kw)


def as_dtype(t, dtype):
    """Detached copies keeping requires_grad: in float64 for the oracle, or (dtype None) in
    their own dtypes for PyTorch's same-dtype computation."""
    return {k: None if v is None else v.detach().to(dtype or v.dtype)
            .requires_grad_(v.requires_grad) for k, v in t.items()}


def check_against_oracle(t, scaling, dtype, **kw):
    y = call(sv_mixture_linear, t, scaling, **kw)
    t64 = as_dtype(t, torch.float64)
    y64 = call(reference.sv_mixture_linear, t64, scaling)
    same = as_dtype(t, None)
    y_same = call(reference.sv_mixture_linear, same, scaling)
    assert y.dtype == t["x"].dtype and y.shape == y64.shape
    assert_close_to_oracle(y, y64, y_same, dtype, "y")
    wanted = [n for n in NAMES if t[n] is not None and t[n].requires_grad]
    if not wanted:
        return
    dy = torch.randn(y.shape, dtype=torch.float64, device=y.device)
    g = torch.autograd.grad(y, [t[n] for n in wanted], dy.to(y.dtype))
    g64 = torch.autograd.grad(y64, [t64[n] for n in wanted], dy)
    g_same = torch.autograd.grad(y_same, [same[n] for n in wanted], dy.to(y.dtype))
    for name, gi, gi64, gis in zip(wanted, g, g64, g_same):
        assert gi.dtype == t[name].dtype and gi.shape == t[name].shape, name
        assert_close_to_oracle(gi, gi64, gis, dtype, f"d{name}")


# -- the op against the oracle ------------------------------------------------------------

@pytest.mark.parametrize("bias,out_scale", [(False, False), (True, False), (False, True),
                                            (True, True)])
@pytest.mark.parametrize("scaling", [1.0, 0.37])
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_torch_backend_matches_oracle(bias, out_scale, scaling, m, dtype):
    t = make_inputs(m=m, dtype=dtype, bias=bias, out_scale=out_scale)
    check_against_oracle(t, scaling, dtype, backend="torch")


@pytest.mark.parametrize("bias,out_scale", [(False, False), (True, True)])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_triton_matches_oracle(bias, out_scale, dtype):
    # On CPU bf16 is covered by test_torch_backend_matches_oracle (PyTorch path) only.
    t = make_inputs(dtype=dtype, bias=bias, out_scale=out_scale)
    check_against_oracle(t, 0.37, dtype, backend="triton")


@pytest.mark.parametrize("fuse_t", [True, False])
@pytest.mark.parametrize("lead,in_f,out_f,r,m", [((7,), 67, 33, 5, 1), ((3, 7), 67, 33, 37, 9),
                                                 ((7,), 67, 33, 5, 3), ((19,), 40, 129, 20, 2)])
def test_triton_odd_shapes(monkeypatch, fuse_t, lead, in_f, out_f, r, m):
    """Both ways of computing t: inside x_at_router, or by x_at first (the GPU's small-M path)."""
    monkeypatch.setattr(router_module, "_fuse_t_by_default", lambda x: fuse_t)
    t = make_inputs(lead=lead, in_f=in_f, out_f=out_f, r=r, m=m)
    check_against_oracle(t, 2.0, torch.float32, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("trainable", [MOSARA_TRAINABLE, ("a", "b"), ("x",), ("weight", "bias"),
                                       ("gate_out",)])
def test_partial_requires_grad(backend, trainable):
    """Mo-SARA trains lambdas, the gates and out_scale; a and b are frozen but must still get
    the right gradient when they do require it. Frozen tensors get no gradient at all."""
    t = make_inputs(lead=(7,), r=5, m=3, trainable=trainable)
    check_against_oracle(t, 0.5, torch.float32, backend=backend)
    call(sv_mixture_linear, t, 0.5, backend=backend).sum().backward()
    for name in NAMES:
        if t[name] is not None:
            assert (t[name].grad is not None) == (name in trainable), name


def test_gradcheck_float64():
    t = make_inputs(lead=(2, 3), in_f=7, out_f=6, r=4, m=3, dtype=torch.float64,
                    adapter_dtype=torch.float64)
    tensors = [t[n] for n in NAMES]

    def fn(*args):
        kw = dict(zip(NAMES, args))
        return sv_mixture_linear(kw["x"], kw["weight"], kw["a"], kw["lambdas"], kw["gate_in"],
                                 kw["gate_out"], kw["b"], bias=kw["bias"],
                                 out_scale=kw["out_scale"], scaling=0.7, backend="torch")
    assert torch.autograd.gradcheck(fn, tensors)


def test_zero_out_scale_is_the_base_layer():
    """Mo-SARA's init (out_scale = 0): y is the frozen layer and only out_scale learns."""
    t = make_inputs(lead=(5,), r=5, m=3, trainable=MOSARA_TRAINABLE)
    with torch.no_grad():
        t["out_scale"].zero_()
    for backend in ("torch", "triton"):
        y = call(sv_mixture_linear, t, 1.0, backend=backend)
        base = torch.nn.functional.linear(t["x"], t["weight"], t["bias"])
        torch.testing.assert_close(y, base, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(y.sum(), [t[n] for n in MOSARA_TRAINABLE])
        assert all(g.abs().max() == 0 for g in grads[:3]) and grads[3].abs().max() > 0


def test_autocast_bf16_with_fp32_model():
    t = make_inputs(trainable=MOSARA_TRAINABLE + ("x",))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = call(sv_mixture_linear, t, 1.0)
    assert y.dtype == torch.bfloat16
    y64 = call(reference.sv_mixture_linear, as_dtype(t, torch.float64), 1.0)
    assert rel_err(y, y64) < FLOOR[torch.bfloat16]
    y.float().sum().backward()
    assert t["lambdas"].grad.dtype == torch.float32 and t["x"].grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(backend):
    t = make_inputs(lead=(0,), r=5, m=3)
    y, gates = call(sv_mixture_linear, t, 1.0, backend=backend, return_gates=True)
    assert y.shape == (0, 33) and gates.shape == (0, 3)
    y.sum().backward()
    assert t["lambdas"].grad.abs().sum() == 0


# -- the gates ------------------------------------------------------------------------------

def reference_gates(t):
    """softmax((x·aᵀ·gate_in) ⊗ gate_out) in float64, as svk.reference computes it."""
    t64 = as_dtype(t, torch.float64)
    c = torch.nn.functional.linear(t64["x"], t64["a"]) @ t64["gate_in"]
    return torch.softmax(c.unsqueeze(-1) * t64["gate_out"], dim=-1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("m", [1, 4])
def test_returned_gates_match_reference_softmax(backend, m):
    t = make_inputs(lead=(3, 7), r=37, m=m)
    y, gates = call(sv_mixture_linear, t, 0.5, backend=backend, return_gates=True)
    assert gates.shape == (3, 7, m) and gates.dtype == torch.float32
    assert not gates.requires_grad
    torch.testing.assert_close(gates.double(), reference_gates(t), rtol=0, atol=1e-6)
    torch.testing.assert_close(gates.sum(-1), torch.ones_like(gates[..., 0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(y, call(sv_mixture_linear, t, 0.5, backend=backend))
    y.sum().backward()  # gates handed out do not disturb autograd
    assert t["lambdas"].grad is not None


# -- the kernel directly ---------------------------------------------------------------------

@pytest.mark.parametrize("fuse_t", [True, False])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("M,K,R,H", [(7, 67, 5, 1), (7, 67, 37, 5), (33, 40, 37, 9),
                                     (16, 32, 48, 16)])
def test_x_at_router_kernel_against_float64(fuse_t, dtype, M, K, R, H):
    """The oracle uses the inputs as the kernel sees them (x in `dtype`, a rounded to x's
    dtype for tl.dot); what is left is fp32 accumulation and the fp32 router, so one
    tolerance (1e-5 relative, ≈ 100 fp32 ulps) holds for both dtypes."""
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    a = torch.randn(R, K, device=DEVICE) * K ** -0.5
    gate_in, gate_out = torch.randn(R, device=DEVICE) * R ** -0.5, torch.randn(H, device=DEVICE)
    lambdas = torch.randn(H, R, device=DEVICE)
    t, g, u = x_at_router(x, a, gate_in, gate_out, lambdas, fuse_t=fuse_t)
    t64 = x.double() @ a.to(dtype).double().t()
    g64 = torch.softmax((t64 @ gate_in.double())[:, None] * gate_out.double(), dim=-1)
    u64 = t64 * (g64 @ lambdas.double())
    assert t.dtype == g.dtype == u.dtype == torch.float32
    for name, value, oracle in (("t", t, t64), ("g", g, g64), ("u", u, u64)):
        assert rel_err(value, oracle) < 1e-5, name


@pytest.mark.parametrize("need_dt,u_dtype", [(True, torch.float16), (False, None),
                                             (True, torch.float32)])
@pytest.mark.parametrize("M,R,H", [(7, 5, 1), (7, 37, 5), (33, 37, 9), (40, 48, 16)])
def test_x_at_router_backward_kernel_against_float64(need_dt, u_dtype, M, R, H):
    """The fused router backward against _backward's formulas in float64. Inputs and outputs
    are fp32 except u (rounded once to u_dtype): 1e-5 relative, or fp16's ε for u."""
    t, du = torch.randn(M, R, device=DEVICE), torch.randn(M, R, device=DEVICE)
    gate_in, gate_out = torch.randn(R, device=DEVICE) * R ** -0.5, torch.randn(H, device=DEVICE)
    lambdas = torch.randn(H, R, device=DEVICE)
    g = torch.softmax((t @ gate_in)[:, None] * gate_out, dim=-1)
    dt, u, dlambdas, dgate_in, dgate_out = x_at_router_backward(
        du, t, g, gate_in, gate_out, lambdas, need_dt=need_dt, u_dtype=u_dtype)
    t64, du64, g64, gi64, go64, lam64 = (v.double() for v in (t, du, g, gate_in, gate_out,
                                                                lambdas))
    ds_eff = du64 * t64
    dg = ds_eff @ lam64.t()
    dz = g64 * (dg - (g64 * dg).sum(-1, keepdim=True))
    dc = dz @ go64
    assert rel_err(dlambdas, g64.t() @ ds_eff) < 1e-5
    assert rel_err(dgate_in, t64.t() @ dc) < 1e-5
    assert rel_err(dgate_out, dz.t() @ (t64 @ gi64)) < 1e-5
    if need_dt:
        assert rel_err(dt, du64 * (g64 @ lam64) + dc[:, None] * gi64) < 1e-5
    else:
        assert dt is None
    if u_dtype is None:
        assert u is None
    else:
        assert u.dtype == u_dtype
        assert rel_err(u, t64 * (g64 @ lam64)) < (1e-3 if u_dtype == torch.float16 else 1e-5)


def test_x_at_router_softmax_is_stable_for_large_logits():
    """Logits of ±1e3 overflow a naive exp; the kernel subtracts the row maximum."""
    x = torch.randn(9, 32, device=DEVICE)
    a = torch.randn(20, 32, device=DEVICE) * 32 ** -0.5
    gate_in, gate_out = torch.randn(20, device=DEVICE), torch.randn(4, device=DEVICE) * 300
    lambdas = torch.randn(4, 20, device=DEVICE)
    _, g, u = x_at_router(x, a, gate_in, gate_out, lambdas)
    t64 = x.double() @ a.double().t()
    g64 = torch.softmax((t64 @ gate_in.double())[:, None] * gate_out.double(), dim=-1)
    assert torch.isfinite(g).all() and torch.isfinite(u).all()
    torch.testing.assert_close(g.double(), g64, rtol=0, atol=1e-4)


def test_x_at_router_strided_inputs():
    """Transposed a, strided x and vector views: the launcher reads through strides."""
    x = torch.randn(40, 11, device=DEVICE)[:, :10].t()[:, ::2]   # (10, 20), odd strides
    a = torch.randn(20, 24, device=DEVICE).t()                     # (24, 20), column-major
    gate_in = torch.randn(48, device=DEVICE)[::2]
    gate_out, lambdas = torch.randn(3, device=DEVICE), torch.randn(24, 3, device=DEVICE).t()
    t, g, u = x_at_router(x, a, gate_in, gate_out, lambdas)
    t64 = x.double() @ a.double().t()
    g64 = torch.softmax((t64 @ gate_in.double())[:, None] * gate_out.double(), dim=-1)
    assert rel_err(t, t64) < 1e-5 and rel_err(g, g64) < 1e-5
    assert rel_err(u, t64 * (g64 @ lambdas.double())) < 1e-5


# -- memory, dispatch, launches ----------------------------------------------------------------

def saved_for_backward(fn, t):
    """Tensors autograd keeps, except those sharing storage with the arguments (x and the
    parameters, which the caller holds anyway)."""
    owned = {v.untyped_storage().data_ptr() for v in t.values() if v is not None}
    saved, kept_x = [], []

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr == t["x"].untyped_storage().data_ptr():
            kept_x.append(tensor)
        if ptr not in owned:
            saved.append(tensor)
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        call(fn, t, 1.0)
    return saved, kept_x


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_saves_x_plus_order_m_r_plus_m_m(backend):
    rows, out_f, r, m = 64, 40, 6, 5
    t = make_inputs(lead=(rows,), in_f=48, out_f=out_f, r=r, m=m)
    saved, kept_x = saved_for_backward(
        lambda *args, **kw: sv_mixture_linear(*args, **kw, backend=backend), t)
    assert kept_x, "x itself is what backward re-reads for da and dW"
    total = sum(s.numel() * s.element_size() for s in saved)
    # exactly t (M, r) and g (M, m) in fp32, nothing of size (M, out)
    assert total == 4 * rows * (r + m), [tuple(s.shape) for s in saved]
    assert all(s.numel() < rows * out_f for s in saved)
    naive, _ = saved_for_backward(reference.sv_mixture_linear, t)
    assert sum(s.numel() * s.element_size() for s in naive) > 4 * total


@pytest.mark.parametrize("strategy", [None, "fused", "one_pass", "merged"])
def test_triton_really_launches(monkeypatch, strategy):
    """Every Triton strategy name maps to "fused" (the update depends on the token)."""
    if strategy is None:
        set_env(monkeypatch, "SVK_STRATEGY", None)
    else:
        set_env(monkeypatch, "SVK_STRATEGY", strategy)
    t = make_inputs(lead=(7,), r=5, m=3)
    # On a GPU 7 rows would take the split path (x_at first): pin the fused one counted here.
    import svk.kernels.x_at_router as router
    monkeypatch.setattr(router, "_fuse_t_by_default", lambda x: True)
    before = LAUNCHES.copy()
    call(sv_mixture_linear, t, 1.0, backend="triton").sum().backward()
    launched = {k: v - before.get(k, 0) for k, v in LAUNCHES.items() if v != before.get(k, 0)}
    # forward: x_at_router + xw_plus_ub; backward: x_at (du = dy·b_eff), the router's
    # backward, xw_plus_ub (dx)
    assert launched == {"x_at_router": 1, "xw_plus_ub": 2, "x_at": 1, "x_at_router_bwd": 1}


def on_cpu(t):
    return {k: None if v is None else v.detach().cpu().requires_grad_(v.requires_grad)
            for k, v in t.items()}


def test_torch_and_auto_on_cpu_launch_nothing(monkeypatch):
    set_env(monkeypatch, "SVK_BACKEND", None)
    t = on_cpu(make_inputs(lead=(7,), r=5, m=3))
    before = LAUNCHES.copy()
    call(sv_mixture_linear, t, 1.0, backend="torch").sum().backward()
    call(sv_mixture_linear, t, 1.0).sum().backward()
    assert LAUNCHES == before


def test_env_backend_changes_auto(monkeypatch):
    set_env(monkeypatch, "SVK_BACKEND", "triton")
    before = LAUNCHES["x_at_router"]
    call(sv_mixture_linear, make_inputs(lead=(7,), r=5, m=3), 1.0)
    assert LAUNCHES["x_at_router"] == before + 1


def test_bad_strategy_env(monkeypatch):
    set_env(monkeypatch, "SVK_STRATEGY", "sideways")
    with pytest.raises(ValueError, match="SVK_STRATEGY"):
        call(sv_mixture_linear, make_inputs(lead=(7,), r=5, m=3), 1.0, backend="triton")


def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(_dispatch, "interpreter_on", lambda: False)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run"):
        call(sv_mixture_linear, on_cpu(make_inputs(lead=(7,), r=5, m=3)), 1.0, backend="triton")


def test_triton_rejects_float64():
    t = make_inputs(lead=(7,), r=5, m=3, dtype=torch.float64, adapter_dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        call(sv_mixture_linear, t, 1.0, backend="triton")


def test_opcheck_torch_path():
    """torch.library.opcheck: schema, fake kernel and autograd registration agree."""
    t = make_inputs(lead=(5,), in_f=9, out_f=7, r=3, m=2)
    args = tuple(t[n] for n in NAMES) + (0.5, 0.0, 0, "torch")
    torch.library.opcheck(torch.ops.svk.sv_mixture_linear.default, args)


@pytest.mark.slow
def test_compile_fullgraph_torch_path():
    """Validation, dispatch and return_gates trace without graph breaks (PyTorch path; the
    Triton path compiles on a GPU only, see test_gpu_compile_fullgraph_with_gates)."""
    t = on_cpu(make_inputs(lead=(2, 5), in_f=16, out_f=12, r=6, m=3,
                           trainable=MOSARA_TRAINABLE))

    def fn(tensors):
        return call(sv_mixture_linear, tensors, 0.5, backend="torch", return_gates=True)
    y, gates = torch.compile(fn, fullgraph=True)(t)
    eager_y, eager_gates = fn(t)
    torch.testing.assert_close(y, eager_y)
    torch.testing.assert_close(gates, eager_gates)
    y.sum().backward()
    assert t["gate_in"].grad is not None


# -- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,error,match", [
    (dict(lambdas=torch.randn(5, 36)), ValueError, r"lambdas must have shape \(m, r=37\)"),
    (dict(lambdas=torch.randn(37)), ValueError, r"lambdas must have shape \(m, r=37\)"),
    (dict(lambdas=torch.randn(37, 5)), ValueError, r"lambdas must have shape \(m, r=37\)"),
    (dict(lambdas=torch.randn(0, 37)), ValueError, r"0 heads"),
    (dict(gate_in=torch.randn(5)), ValueError, r"gate_in must have shape \(37,\)"),
    (dict(gate_in=torch.randn(37, 1)), ValueError, r"gate_in must have shape \(37,\)"),
    (dict(gate_out=torch.randn(4)), ValueError, r"gate_out must have shape \(5,\)"),
    (dict(gate_out=torch.randn(37)), ValueError, r"gate_out must have shape \(5,\)"),
    (dict(a=torch.randn(37, 66)), ValueError, r"a must have shape \(r, in=67\)"),
    (dict(a=torch.randn(0, 67)), ValueError, r"rank 0"),
    (dict(b=torch.randn(37, 33)), ValueError, r"b must have shape \(33, 37\)"),
    (dict(out_scale=torch.randn(32)), ValueError, r"out_scale must have shape \(33,\)"),
    (dict(bias=torch.randn(1)), ValueError, r"bias must have shape \(33,\)"),
    (dict(x=torch.randn(3, 66)), ValueError, r"x has 66 features"),
    (dict(lambdas=torch.ones(5, 37, dtype=torch.int64)), TypeError,
     r"lambdas must be a floating tensor"),
    (dict(gate_out=None), TypeError, r"gate_out must be a tensor"),
    (dict(gate_in=[0.0] * 37), TypeError, r"gate_in must be a torch.Tensor"),
    (dict(weight=torch.randn(33, 67, dtype=torch.float64)), TypeError, r"weight has dtype"),
    (dict(gate_out=torch.randn(5, device="meta")), ValueError, r"gate_out is on meta"),
])
def test_bad_input(changes, error, match):
    t = make_inputs(trainable=())
    t.update(changes)
    with pytest.raises(error, match=match):
        call(sv_mixture_linear, t, 1.0)


def test_bad_backend_scaling_and_return_gates():
    t = make_inputs(trainable=())
    with pytest.raises(ValueError, match="backend must be one of"):
        call(sv_mixture_linear, t, 1.0, backend="cuda")
    with pytest.raises(TypeError, match="scaling must be a real number"):
        call(sv_mixture_linear, t, torch.tensor(1.0))
    with pytest.raises(TypeError, match="return_gates must be a bool"):
        call(sv_mixture_linear, t, 1.0, return_gates="yes")


# -- GPU only (skipped without CUDA; the interpreter cannot trace compile or capture graphs) --

@pytest.mark.gpu
@pytest.mark.parametrize("fuse_t", [True, False])
def test_gpu_mosara_sized_rank(monkeypatch, fuse_t):
    """A rank that spans many BLOCK_R tiles (r = 300) in bf16, both ways of computing t."""
    monkeypatch.setattr(router_module, "_fuse_t_by_default", lambda x: fuse_t)
    t = make_inputs(lead=(257,), in_f=256, out_f=192, r=300, m=5, dtype=torch.bfloat16,
                    trainable=MOSARA_TRAINABLE + ("x",))
    check_against_oracle(t, 1.0, torch.bfloat16, backend="triton")


@pytest.mark.gpu
def test_gpu_opcheck_fused():
    t = make_inputs(lead=(33,), in_f=64, out_f=48, r=24, m=3, dtype=torch.bfloat16)
    args = tuple(t[n] for n in NAMES) + (0.5, 0.0, 0, "fused")
    torch.library.opcheck(torch.ops.svk.sv_mixture_linear.default, args)


@pytest.mark.gpu
def test_gpu_compile_fullgraph_with_gates():
    t = make_inputs(lead=(4, 16), in_f=128, out_f=96, r=40, m=5, dtype=torch.bfloat16,
                    trainable=MOSARA_TRAINABLE)
    eager_y, eager_g = call(sv_mixture_linear, t, 1.0, return_gates=True)
    compiled = torch.compile(lambda tt: call(sv_mixture_linear, tt, 1.0, return_gates=True),
                             fullgraph=True)
    y, gates = compiled(t)
    torch.testing.assert_close(y, eager_y)
    torch.testing.assert_close(gates, eager_g)
    y.float().sum().backward()
    assert t["lambdas"].grad is not None
