"""Promises of the ops that adversarial testing broke (issues 13 and 14): refusals that name
what is wrong instead of silent wrong answers, base-model rows that nothing can poison, a
bank gradient without a bank-sized fp32 copy, and a strategy choice made by measurement."""
import numpy as np
import pytest
import torch

import svk
from svk import reference
from svk.kernels._common import LAUNCHES
from svk.ops import _dispatch
from tests.utils import rel_err, set_env

D_IN, D_OUT, R = 12, 10, 4


def _linear_args(dtype=torch.float32, grad=("core",)):
    g = torch.Generator().manual_seed(1)
    t = dict(x=torch.randn(5, D_IN, generator=g), weight=torch.randn(D_OUT, D_IN, generator=g),
             a=torch.randn(R, D_IN, generator=g), s=torch.rand(R, generator=g),
             b=torch.randn(D_OUT, R, generator=g), bias=torch.randn(D_OUT, generator=g),
             core=torch.randn(R, R, generator=g))
    t = {k: v.to(dtype) for k, v in t.items()}
    for name in grad:
        t[name].requires_grad_()
    return t


def _sv_linear(t, **kw):
    return svk.sv_linear(t["x"], t["weight"], t["a"], t["s"], t["b"], bias=t["bias"],
                         core=t["core"], **kw)


def _mixture_args():
    g = torch.Generator().manual_seed(2)
    return (torch.randn(5, D_IN, generator=g), torch.randn(D_OUT, D_IN, generator=g),
            torch.randn(R, D_IN, generator=g), torch.randn(3, R, generator=g),
            torch.randn(R, generator=g), torch.randn(3, generator=g),
            torch.randn(D_OUT, R, generator=g))


def _bank_args(n=3):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(6, D_IN, generator=g), torch.randn(D_OUT, D_IN, generator=g),
            torch.randn(R, D_IN, generator=g), torch.rand(R, generator=g),
            torch.randn(D_OUT, R, generator=g), torch.randn(n, R, R, generator=g))


# ---- forward-mode AD and double backward: refused, never silently zero -------------------

def test_forward_mode_ad_is_refused_not_zero():
    t = _linear_args(grad=())
    tangent = torch.randn_like(t["x"])
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jvp(lambda x: _sv_linear({**t, "x": x}), (t["x"],), (tangent,))
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        _sv_linear({**t, "x": fwAD.make_dual(t["x"], tangent)})


def test_forward_mode_ad_refused_for_mixture_and_bank():
    x, w, a, lam, gi, go, b = _mixture_args()
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jvp(lambda v: svk.sv_mixture_linear(v, w, a, lam, gi, go, b), (x,),
                       (torch.randn_like(x),))
    x, w, a, s, b, cores = _bank_args()
    ids = torch.tensor([0, 1, -1, 2, 0, 1])
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jvp(lambda v: svk.sv_bank_linear(v, w, a, s, b, cores, ids), (x,),
                       (torch.randn_like(x),))


def test_double_backward_is_refused_at_the_first_backward():
    t = _linear_args(grad=("x", "core"))
    y = _sv_linear(t)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.square().sum(), t["core"], create_graph=True)
    # A plain backward still works after the refusal.
    (g,) = torch.autograd.grad(_sv_linear(t).sum(), t["core"])
    assert torch.isfinite(g).all()


# ---- meta tensors: shape inference works ---------------------------------------------------

def test_meta_device_shapes():
    t = {k: v.detach().to("meta") for k, v in _linear_args(grad=()).items()}
    t["x"] = torch.empty(2, 3, D_IN, device="meta")
    assert _sv_linear(t).shape == (2, 3, D_OUT)
    x, w, a, lam, gi, go, b = (v.to("meta") for v in _mixture_args())
    assert svk.sv_mixture_linear(x, w, a, lam, gi, go, b).shape == (5, D_OUT)
    x, w, a, s, b, cores = (v.to("meta") for v in _bank_args())
    ids = torch.zeros(6, dtype=torch.int64, device="meta")
    assert svk.sv_bank_linear(x, w, a, s, b, cores, ids).shape == (6, D_OUT)


# ---- argument checks -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bias_dtype_is_checked_like_weight(backend):
    t = _linear_args(grad=())
    t["bias"] = t["bias"].double()
    with pytest.raises(TypeError, match="bias has dtype torch.float64 but x has"):
        _sv_linear(t, backend=backend)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e308])
def test_scaling_must_be_finite(value):
    with pytest.raises(ValueError, match="scaling must be finite"):
        _sv_linear(_linear_args(grad=()), scaling=value)


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), np.int64(2), 2])
def test_numpy_and_int_scaling_accepted(value):
    t = _linear_args(grad=())
    expected = _sv_linear(t, scaling=float(value))
    assert torch.equal(_sv_linear(t, scaling=value), expected)


def test_bank_with_no_adapters_is_a_clear_error():
    x, w, a, s, b, _ = _bank_args()
    with pytest.raises(ValueError, match="cores holds 0 adapters"):
        svk.sv_bank_linear(x, w, a, s, b, torch.empty(0, R, R), torch.full((6,), -1))


def test_bank_ids_message_names_both_layouts():
    x, w, a, s, b, cores = _bank_args()
    x = x.reshape(2, 3, D_IN)
    with pytest.raises(ValueError, match=r"\(2, 3\) \(one id per row of x\) or \(2,\) "
                                         r"\(one per sequence, batch first\)"):
        svk.sv_bank_linear(x, w, a, s, b, cores, torch.zeros(3, dtype=torch.int64))


# ---- the bank: base-model rows are the base layer, whatever the adapters hold ---------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_in_an_adapter_never_reaches_base_rows(backend):
    x, w, a, s, b, cores = _bank_args()
    cores[0] = float("nan")
    ids = torch.tensor([-1, 1, -1, 2, -1, 0])
    y = svk.sv_bank_linear(x, w, a, s, b, cores, ids, backend=backend)
    base = torch.nn.functional.linear(x, w)
    rows = ids == -1
    assert torch.allclose(y[rows], base[rows], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(y[ids > 0]).all() and torch.isnan(y[ids == 0]).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_finite_base_rows_leave_adapter_grads_finite(backend):
    x, w, a, s, b, cores = _bank_args()
    x[0] = float("inf")
    x[2] = float("nan")
    cores.requires_grad_()
    ids = torch.tensor([-1, 1, -1, 2, 1, 0])
    y = svk.sv_bank_linear(x, w, a, s, b, cores, ids, backend=backend)
    dy = torch.randn_like(y)
    dy[ids == -1] = 0.0
    (g,) = torch.autograd.grad(y, cores, dy)
    assert torch.isfinite(g).all()
    # Against the float64 oracle on the adapter rows alone.
    keep = ids >= 0
    c64 = cores.detach().double().requires_grad_()
    y64 = reference.sv_bank_linear(x[keep].double(), w.double(), a.double(), s.double(),
                                   b.double(), c64, ids[keep])
    (g64,) = torch.autograd.grad(y64, c64, dy[keep].double())
    assert rel_err(g, g64) < 1e-5


@pytest.mark.parametrize("cores_dtype", [torch.float32, torch.bfloat16])
def test_bank_core_gradient_groups_repeated_ids(cores_dtype):
    """Rows of the same adapter sum into one gradient (fp32 sums, rounded once to cores'
    dtype); adapters no row uses get exactly zero; the gradient has cores' dtype."""
    x, w, a, s, b, cores = _bank_args(n=7)
    x = torch.randn(40, D_IN)
    ids = torch.randint(-1, 5, (40,))        # slots 5 and 6 unused, many repeats, base rows
    cores = cores.to(cores_dtype).requires_grad_()
    y = svk.sv_bank_linear(x, w, a, s, b, cores, ids, scaling=0.7)
    dy = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, cores, dy)
    assert g.dtype == cores_dtype
    assert (g[5:] == 0).all()
    c64 = cores.detach().double().requires_grad_()
    y64 = reference.sv_bank_linear(x.double(), w.double(), a.double(), s.double(), b.double(),
                                   c64, ids, scaling=0.7)
    (g64,) = torch.autograd.grad(y64, c64, dy.double())
    # bf16: one rounding of each adapter's sum (2^-8 relative); fp32 sums: 1e-5.
    assert rel_err(g, g64) < (8e-3 if cores_dtype == torch.bfloat16 else 1e-5)


# ---- merged never for 16-bit weights ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_auto_never_merges_16_bit_weights(dtype):
    for m in (300, 10_000, 1 << 20):
        assert _dispatch.choose_strategy(m, 32, 32, 16, 128, weight_dtype=dtype) != "merged"
    assert _dispatch.choose_strategy(1 << 20, 32, 32, 16, 128,
                                     weight_dtype=torch.float32) == "merged"


def test_forced_merged_refuses_16_bit(monkeypatch):
    set_env(monkeypatch, "SVK_STRATEGY", "merged")
    t = _linear_args(dtype=torch.float16, grad=())
    with pytest.raises(ValueError, match="merged cannot run a torch.float16 weight"):
        _sv_linear(t, backend="triton")


def test_fp16_effective_update_on_triton_auto_dispatch():
    """M = 300 rows at 32×32 is where the old rule chose merged. The adapter's own
    contribution, fitted over the tokens, must be as accurate as the PyTorch path's."""
    g = torch.Generator().manual_seed(5)
    m, n, r = 300, 32, 8
    x = torch.randn(m, n, generator=g)
    w = torch.randn(n, n, generator=g) / n ** 0.5
    a, b = torch.randn(r, n, generator=g) / n ** 0.5, torch.randn(n, r, generator=g)
    s, core = torch.rand(r, generator=g), torch.randn(r, r, generator=g) * 3e-3
    delta = (b @ core @ torch.diag(s) @ a).double()          # |ΔW|/|W| ≈ 3e-3

    def fitted(backend):
        y = svk.sv_linear(x.half(), w.half(), a, s, b, core=core, backend=backend).double()
        residual = y - x.half().double() @ w.half().double().t()
        return torch.linalg.lstsq(x.half().double(), residual).solution.t()
    err_triton = rel_err(fitted("triton"), delta)
    err_torch = rel_err(fitted("torch"), delta)
    assert err_triton <= max(2 * err_torch, 0.05), (err_triton, err_torch)


# ---- choosing the strategy by measurement ----------------------------------------------------

def _fake_timer(times, calls):
    def timer(run):
        calls.append(run.name)
        return times[run.name]
    return timer


def _candidates(names):
    runs = {}
    for name in names:
        def run(name=name):
            return name
        run.name = name
        runs[name] = run
    return runs


def test_tuner_picks_the_fastest_and_remembers_on_disk(tmp_path):
    calls = []
    times = {"torch": 3.0, "fused": 1.0, "one_pass": 2.0}
    tuner = _dispatch.StrategyTuner(tmp_path / "s.json", timer=_fake_timer(times, calls))
    cpu = torch.device("cpu")
    assert tuner.choose("k1", cpu, _candidates(times)) == "fused"
    assert sorted(calls) == ["fused", "one_pass", "torch"]
    assert tuner.choose("k1", cpu, _candidates(times)) == "fused"
    assert len(calls) == 3                     # remembered in memory: no second timing
    # Another process (a new tuner on the same file) reads the choice without timing.
    calls2 = []
    again = _dispatch.StrategyTuner(tmp_path / "s.json", timer=_fake_timer(times, calls2))
    assert again.choose("k1", cpu, _candidates(times)) == "fused" and calls2 == []
    # A pinned choice wins over timing.
    again.pin("k2", "torch", cpu)
    assert again.choose("k2", cpu, _candidates(times)) == "torch" and calls2 == []


def test_tuner_refuses_to_time_inside_a_capture(monkeypatch, tmp_path):
    tuner = _dispatch.StrategyTuner(tmp_path / "s.json", timer=lambda run: 1.0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(tuner, "_scope", lambda device: "fake-gpu")
    with pytest.raises(RuntimeError, match="svk.warmup"):
        tuner.choose("k", torch.device("cuda"), _candidates(["torch", "fused"]))


def test_measured_dispatch_runs_the_winner(monkeypatch, tmp_path):
    """Auto dispatch with measurement switched on (as on CUDA): a timer that makes the
    PyTorch path fastest means no Triton kernel launches, and the answer is the oracle's."""
    tuner = _dispatch.StrategyTuner(
        tmp_path / "s.json", timer=lambda run: 0.0 if run.__defaults__[0] == "torch" else 1.0)
    monkeypatch.setattr(_dispatch, "TUNER", tuner)
    monkeypatch.setattr(_dispatch, "measured_choice", lambda device: True)
    t = _linear_args(grad=())
    before = LAUNCHES.copy()
    y = _sv_linear(t, backend="triton")
    assert LAUNCHES == before
    t64 = {k: v.double() for k, v in t.items()}
    assert rel_err(y, reference.sv_linear(t64["x"], t64["weight"], t64["a"], t64["s"], t64["b"],
                                          bias=t64["bias"], core=t64["core"])) < 2e-5
    assert list(tuner._memory.values()) == ["torch"]
