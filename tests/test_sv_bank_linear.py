"""sv_bank_linear against a per-row float64 oracle: ids −1, per-sequence broadcast, every
gradient (dcores a scatter-add over rows), every backend and Triton strategy (interpreter on
CPU), the native op when it builds, bad ids/dtypes/shapes, and launches that do not depend on
how many distinct adapters a batch holds."""
import os

import pytest
import torch

import svk
from svk import reference
from svk.kernels._common import LAUNCHES
from svk.ops.sv_bank_linear import sv_bank_linear
from tests.utils import DEVICE, FLOOR, rel_err, set_env

NAMES = ("x", "weight", "a", "s", "b", "bias", "cores")


def make_inputs(lead=(3, 5), in_f=37, out_f=29, r=6, n=5, dtype=torch.float32, bias=True,
                requires_grad=True):
    shapes = {"x": lead + (in_f,), "weight": (out_f, in_f), "a": (r, in_f), "s": (r,),
              "b": (out_f, r), "bias": (out_f,), "cores": (n, r, r)}
    t = {}
    for name, shape in shapes.items():
        scale = in_f ** -0.5 if name in ("weight", "a") else 1.0
        base = name in ("x", "weight", "bias")
        value = (torch.randn(shape, dtype=torch.float64) * scale).to(
            DEVICE, dtype if base else torch.float32)
        t[name] = value.requires_grad_(requires_grad)
    if not bias:
        t["bias"] = None
    return t


def per_row_oracle(t, ids, scaling):
    """Float64, one row at a time: y_i = x_i·Wᵀ + bias + scaling·((x_i·aᵀ ⊙ s)·cores[id_i]ᵀ)·bᵀ."""
    d = {k: None if v is None else v.double() for k, v in t.items()}
    x = d["x"].reshape(-1, d["x"].shape[-1])
    rows = x.shape[0]
    ids = ids.reshape(-1) if ids.numel() == rows else ids.repeat_interleave(rows // ids.numel())
    out = []
    for i in range(rows):
        y = x[i] @ d["weight"].t()
        if d["bias"] is not None:
            y = y + d["bias"]
        if ids[i] >= 0:
            u = ((x[i] @ d["a"].t()) * d["s"]) @ d["cores"][ids[i]].t()
            y = y + scaling * (u @ d["b"].t())
        out.append(y)
    return torch.stack(out).reshape(*t["x"].shape[:-1], -1)


def check(t, ids, scaling=0.75, backend="torch", tol=None):
    dtype = t["x"].dtype
    tol = tol or max(FLOOR[dtype], 2e-5)
    y = sv_bank_linear(t["x"], t["weight"], t["a"], t["s"], t["b"], t["cores"], ids,
                       bias=t["bias"], scaling=scaling, backend=backend)
    t64 = {k: None if v is None else v.detach().double().requires_grad_() for k, v in t.items()}
    y64 = per_row_oracle(t64, ids, scaling)
    assert y.dtype == dtype and y.shape == y64.shape
    assert rel_err(y, y64) <= tol, f"y: {rel_err(y, y64):.3g}"
    weight = torch.randn(y.shape, dtype=torch.float64, device=y.device)
    wanted = [n for n in NAMES if t[n] is not None and t[n].requires_grad]
    g = torch.autograd.grad(y, [t[n] for n in wanted], weight.to(dtype))
    g64 = torch.autograd.grad(y64, [t64[n] for n in wanted], weight)
    for name, gi, gi64 in zip(wanted, g, g64):
        assert gi.shape == t[name].shape and gi.dtype == t[name].dtype, name
        # Rows of dcores no row selected must be exactly zero, not merely small.
        if name == "cores":
            unused = torch.ones(gi.shape[0], dtype=torch.bool)
            unused[ids[ids >= 0].unique().cpu()] = False
            assert torch.all(gi[unused.to(gi.device)] == 0)
        assert rel_err(gi, gi64) <= 4 * tol, f"d{name}: {rel_err(gi, gi64):.3g}"
    return y


def random_ids(shape, n):
    ids = torch.randint(-1, n, shape, device=DEVICE)
    ids.view(-1)[0] = -1          # always at least one base row and one adapter row
    ids.view(-1)[-1] = n - 1
    return ids


TRITON = [pytest.param(s, id=s) for s in ("one_pass", "fused")]


@pytest.fixture
def strategy(request, monkeypatch):
    set_env(monkeypatch, "SVK_STRATEGY", request.param)
    return request.param


def test_reference_matches_per_row_oracle():
    t = make_inputs(requires_grad=False)
    ids = random_ids((3, 5), 5)
    y = reference.sv_bank_linear(*(t[n].double() for n in NAMES[:5]), t["cores"].double(), ids,
                                 bias=t["bias"].double(), scaling=0.5)
    assert rel_err(y, per_row_oracle(t, ids, 0.5)) < 1e-12


@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_torch_backend(per_sequence, bias):
    t = make_inputs(bias=bias)
    check(t, random_ids((3,) if per_sequence else (3, 5), 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_backend_half(dtype):
    check(make_inputs(dtype=dtype), random_ids((3, 5), 5), tol=FLOOR[dtype])


@pytest.mark.parametrize("strategy", TRITON, indirect=True)
@pytest.mark.parametrize("per_sequence", [False, True])
def test_triton_strategies(strategy, per_sequence):
    t = make_inputs(lead=(3, 6), in_f=45, out_f=40, r=5)
    LAUNCHES.clear()
    check(t, random_ids((3,) if per_sequence else (3, 6), 5), backend="triton")
    kernel = "xw_plus_xa_gather_core_b" if strategy == "one_pass" else "x_at_gather_core"
    assert LAUNCHES[kernel] == 1


@pytest.mark.parametrize("strategy", TRITON, indirect=True)
def test_triton_fp16_rank_17_no_bias(strategy):
    # Rank 17 pads to 32; fp16 activations with fp32 cores; odd row count.
    t = make_inputs(lead=(19,), in_f=33, out_f=18, r=17, n=3, dtype=torch.float16, bias=False)
    check(t, random_ids((19,), 3), backend="triton", tol=FLOOR[torch.float16])


def test_auto_on_cpu_is_torch():
    t = make_inputs(requires_grad=False)
    LAUNCHES.clear()
    sv_bank_linear(t["x"], t["weight"], t["a"], t["s"], t["b"], t["cores"], random_ids((3,), 5))
    if DEVICE.type == "cpu":
        assert sum(LAUNCHES.values()) == 0


def test_minus_one_rows_equal_base_layer():
    t = make_inputs(requires_grad=False)
    ids = torch.full((3, 5), -1, device=DEVICE)
    y = sv_bank_linear(t["x"], t["weight"], t["a"], t["s"], t["b"], t["cores"], ids,
                       bias=t["bias"])
    torch.testing.assert_close(y, torch.nn.functional.linear(t["x"], t["weight"], t["bias"]))


def test_per_sequence_equals_per_row():
    t = make_inputs(requires_grad=False)
    per_seq = torch.tensor([2, -1, 4], device=DEVICE)
    args = (t["x"], t["weight"], t["a"], t["s"], t["b"], t["cores"])
    y1 = sv_bank_linear(*args, per_seq, bias=t["bias"])
    y2 = sv_bank_linear(*args, per_seq[:, None].expand(3, 5).contiguous(), bias=t["bias"])
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def test_int32_ids_and_autocast():
    t = make_inputs(requires_grad=False)
    ids = random_ids((3, 5), 5).to(torch.int32)
    args = (t["x"], t["weight"], t["a"], t["s"], t["b"], t["cores"])
    y = sv_bank_linear(*args, ids, bias=t["bias"])
    assert rel_err(y, per_row_oracle(t, ids.long(), 1.0)) < 2e-5
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y16 = sv_bank_linear(*args, ids, bias=t["bias"])
    assert y16.dtype == torch.bfloat16
    assert rel_err(y16, y) < FLOOR[torch.bfloat16]


def test_one_mixed_batch_trains_each_users_core():
    """dcores[n] sums the outer products of exactly the rows that selected adapter n."""
    t = make_inputs(lead=(8,), requires_grad=False)
    cores = t["cores"].clone().requires_grad_()
    ids = torch.tensor([0, 3, 3, -1, 0, 3, 1, -1], device=DEVICE)
    y = sv_bank_linear(t["x"], t["weight"], t["a"], t["s"], t["b"], cores, ids, scaling=0.5)
    dy = torch.randn_like(y)
    (dcores,) = torch.autograd.grad(y, cores, dy)
    p = (t["x"] @ t["a"].t()) * t["s"]
    du = 0.5 * dy @ t["b"]
    for n in range(cores.shape[0]):
        rows = ids == n
        expected = du[rows].t() @ p[rows]
        torch.testing.assert_close(dcores[n], expected, rtol=1e-5, atol=1e-5)


def test_empty_batch():
    t = make_inputs(lead=(0,))
    y = sv_bank_linear(t["x"], t["weight"], t["a"], t["s"], t["b"], t["cores"],
                       torch.zeros(0, dtype=torch.long, device=DEVICE), bias=t["bias"])
    assert y.shape == (0, 29)
    y.sum().backward()
    assert torch.all(t["cores"].grad == 0)


@pytest.mark.parametrize("strategy", TRITON, indirect=True)
def test_launches_do_not_depend_on_distinct_adapters(strategy):
    t = make_inputs(lead=(16,), in_f=32, out_f=32, r=4, n=16)
    counts = []
    for ids in (torch.zeros(16, dtype=torch.long), torch.arange(16)):
        LAUNCHES.clear()
        y = sv_bank_linear(t["x"], t["weight"], t["a"], t["s"], t["b"], t["cores"],
                           ids.to(DEVICE), backend="triton")
        y.sum().backward()
        counts.append(dict(LAUNCHES))
    assert counts[0] == counts[1] and sum(counts[0].values()) > 0


def test_decode_forward_is_one_launch(monkeypatch):
    set_env(monkeypatch, "SVK_STRATEGY", "one_pass")
    t = make_inputs(lead=(4, 1), in_f=32, out_f=48, r=8, n=7, requires_grad=False)
    LAUNCHES.clear()
    y = _call(t, torch.tensor([6, -1, 0, 3], device=DEVICE), bias=t["bias"], scaling=0.3,
              backend="triton")
    assert dict(LAUNCHES) == {"xw_plus_xa_gather_core_b": 1}
    ids = torch.tensor([6, -1, 0, 3], device=DEVICE)
    assert rel_err(y, per_row_oracle(t, ids, 0.3)) < 2e-5


def test_kernel_gather_core_transpose_and_bad_ids():
    from svk.kernels.gather_core import gather_core
    p = torch.randn(21, 20, device=DEVICE)
    cores = torch.randn(4, 20, 20, device=DEVICE, dtype=torch.float16)
    ids = torch.tensor([0, 1, 2, 3, -1, 4, 99] * 3, device=DEVICE)
    for transpose in (False, True):
        u = gather_core(p, cores, ids, transpose=transpose)
        c = cores.float()
        for i in range(21):
            if 0 <= ids[i] < 4:
                core = c[ids[i]] if transpose else c[ids[i]].t()
                torch.testing.assert_close(u[i], p[i] @ core, rtol=1e-4, atol=1e-4)
            else:   # out of range reads nothing
                assert torch.all(u[i] == 0)


def test_kernel_large_rank_fused_falls_back_to_two_launches():
    from svk.kernels.x_at_gather_core import x_at_gather_core
    x = torch.randn(3, 16, device=DEVICE)
    a = torch.randn(130, 16, device=DEVICE)
    s = torch.rand(130, device=DEVICE)
    cores = torch.randn(2, 130, 130, device=DEVICE)
    ids = torch.tensor([1, -1, 0], device=DEVICE)
    t, u = x_at_gather_core(x, a, s, cores, ids)
    torch.testing.assert_close(t, x @ a.t(), rtol=1e-4, atol=1e-4)
    expected = torch.stack([(t[i] * s) @ cores[ids[i]].t() if ids[i] >= 0 else torch.zeros(130, device=DEVICE)
                            for i in range(3)])
    torch.testing.assert_close(u, expected, rtol=1e-4, atol=1e-3)


# Bad input ---------------------------------------------------------------------------------

def _call(t, ids, **kw):
    return sv_bank_linear(t["x"], t["weight"], t["a"], t["s"], t["b"], t["cores"], ids, **kw)


@pytest.mark.parametrize("bad", [5, -2, 1000])
def test_out_of_range_ids_raise(bad):
    # On CPU tensors: on CUDA the check is a device-side assert, which would poison the CUDA
    # context for every later test.
    t = {k: v.cpu() if isinstance(v, torch.Tensor) else v
         for k, v in make_inputs(requires_grad=False).items()}
    ids = torch.zeros(3, 5, dtype=torch.long)
    ids[1, 2] = bad
    with pytest.raises(ValueError, match=rf"adapter_ids holds {bad}, outside \[-1, 4\]"):
        _call(t, ids)


@pytest.mark.parametrize("ids", [torch.zeros(3, 5), torch.zeros(3, 5, dtype=torch.bool), [0, 1, 2]],
                         ids=["float", "bool", "list"])
def test_non_integer_ids_raise_type_error(ids):
    with pytest.raises(TypeError, match="adapter_ids"):
        _call(make_inputs(requires_grad=False), ids)


@pytest.mark.parametrize("shape", [(5,), (3, 4), (15,), (3, 5, 1)])
def test_wrong_id_shape_raises(shape):
    with pytest.raises(ValueError, match=r"adapter_ids must have shape \(3, 5\)"):
        _call(make_inputs(requires_grad=False),
              torch.zeros(shape, dtype=torch.long, device=DEVICE))


def test_bad_cores_and_factors():
    t = make_inputs(requires_grad=False)
    ids = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"cores must have shape \(n_adapters, r=6, r=6\)"):
        sv_bank_linear(t["x"], t["weight"], t["a"], t["s"], t["b"], t["cores"][:, :5], ids)
    with pytest.raises(TypeError, match="cores must be a floating tensor"):
        sv_bank_linear(t["x"], t["weight"], t["a"], t["s"], t["b"], t["cores"].long(), ids)
    with pytest.raises(ValueError, match=r"b must have shape \(29, 6\)"):
        sv_bank_linear(t["x"], t["weight"], t["a"], t["s"], t["b"][:, :5], t["cores"], ids)
    with pytest.raises(ValueError, match="backend must be one of"):
        _call(t, ids, backend="cuda")
    with pytest.raises(TypeError, match="weight has dtype"):
        sv_bank_linear(t["x"], t["weight"].double(), t["a"], t["s"], t["b"], t["cores"], ids)


@pytest.mark.skipif(DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="only meaningful without the interpreter on CPU")
def test_forced_triton_on_cpu_raises():
    with pytest.raises(RuntimeError, match="backend='triton' cannot run"):
        _call(make_inputs(requires_grad=False), torch.zeros(3, dtype=torch.long),
              backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("strategy", TRITON, indirect=True)
def test_gpu_half_kernels(dtype, strategy):
    t = make_inputs(lead=(4, 33), in_f=256, out_f=192, r=16, n=100, dtype=dtype)
    check(t, random_ids((4,), 100), backend="triton", tol=FLOOR[dtype])


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    t = make_inputs(lead=(8,), in_f=128, out_f=128, r=16, n=1000, requires_grad=False)
    ids = torch.randint(-1, 1000, (8,), device=DEVICE)
    _call(t, ids)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = _call(t, ids)
    graph.replay()
    torch.testing.assert_close(y, per_row_oracle(t, ids, 1.0).float(), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_gpu_opcheck():
    t = make_inputs(lead=(8,), in_f=64, out_f=64, r=8, n=10)
    ids = torch.randint(-1, 10, (8,), device=DEVICE)
    from svk.ops.sv_bank_linear import sv_bank_linear_op  # noqa: F401
    torch.library.opcheck(torch.ops.svk.sv_bank_linear.default,
                          (t["x"], t["weight"], t["a"], t["s"], t["b"], t["bias"], t["cores"], ids,
                           1.0, "one_pass"))
