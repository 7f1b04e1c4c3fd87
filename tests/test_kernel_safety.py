"""The kernels' launchers on inputs a model really passes (issue 13, items 3–6 and 9):
sliced and expanded (stride-0) vectors, the fp32_precision API, tensors on different devices
and GPUs, autotuning inside a CUDA-graph capture, autotune keys, tuning files, svk.warmup.

Oracle tests run every op and Triton strategy under the interpreter on CPU (fp32) against
svk.reference evaluated in float64, forward and every gradient."""
import contextlib
import inspect
import json

import pytest
import torch
import triton
import triton.language as tl

import svk
import svk.warmup  # noqa: F401  (svk.warmup(...) is the module, callable)
from svk import reference
from svk.kernels import _common, _tuning
from svk.ops import _dispatch
from tests.utils import DEVICE, assert_close_to_oracle

ON_GPU = DEVICE.type == "cuda"


def _force_strategy(monkeypatch, strategy):
    if strategy is None:
        monkeypatch.delenv("SVK_STRATEGY", raising=False)
    else:
        monkeypatch.setenv("SVK_STRATEGY", strategy)
    getattr(_dispatch, "reload_settings", lambda: None)()


@pytest.fixture(autouse=True)
def _settings_back(monkeypatch):
    yield
    monkeypatch.undo()
    getattr(_dispatch, "reload_settings", lambda: None)()


def _leaf(*shape, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(DEVICE, torch.float32)


def _vector(kind, n):
    """(leaf, make_view): the view is what the op gets; gradients go to the leaf.
    sliced: every other element of a longer vector, from offset 1 (stride 2);
    expanded: one value broadcast to n (stride 0, storage of one element)."""
    if kind == "sliced":
        return _leaf(2 * n + 1), lambda leaf: leaf[1::2]
    return _leaf(1), lambda leaf: leaf.expand(n)


def _check_op(fn, oracle_fn, leaves, views, build, name):
    """Runs fn on the views of the leaves and the float64 oracle on float64 copies of the same
    views; compares y and the gradient of every leaf (2× PyTorch-in-fp32 or the fp32 floor)."""
    def run(f, dtype):
        ls = {k: v.detach().to(dtype).requires_grad_() for k, v in leaves.items()}
        args = build({k: (views[k](v) if k in views else v) for k, v in ls.items()})
        y = f(**args)
        return y, ls
    y, ls = run(fn, torch.float32)
    y64, ls64 = run(oracle_fn, torch.float64)
    y32, ls32 = run(oracle_fn, torch.float32)
    assert_close_to_oracle(y, y64, y32, torch.float32, f"{name}: y")
    weight = torch.randn(y.shape, dtype=torch.float64, device=y.device)
    keys = list(leaves)
    g = torch.autograd.grad(y, [ls[k] for k in keys], weight.float())
    g64 = torch.autograd.grad(y64, [ls64[k] for k in keys], weight)
    g32 = torch.autograd.grad(y32, [ls32[k] for k in keys], weight.float())
    for k, gi, gi64, gi32 in zip(keys, g, g64, g32):
        assert_close_to_oracle(gi, gi64, gi32, torch.float32, f"{name}: d{k}")


# ---- item 3: sliced and expanded s, bias and gate vectors -----------------------------------

@pytest.mark.parametrize("kind", ["sliced", "expanded"])
@pytest.mark.parametrize("strategy", ["fused", "one_pass", "merged"])
def test_sv_linear_strided_vectors(monkeypatch, strategy, kind):
    """Issue 13.3: s and bias were loaded as if contiguous (relative errors near 0.3 for a
    slice, reads past the storage for an expanded one)."""
    _force_strategy(monkeypatch, strategy)
    m, k, n, r = 9, 24, 20, 5
    s, s_view = _vector(kind, r)
    bias, bias_view = _vector(kind, n)
    leaves = dict(x=_leaf(m, k), weight=_leaf(n, k, scale=k ** -0.5), a=_leaf(r, k, scale=k ** -0.5),
                  s=s, b=_leaf(n, r), bias=bias, core=_leaf(r, r))
    views = dict(s=s_view, bias=bias_view)

    def build(t):
        return dict(x=t["x"], weight=t["weight"], a=t["a"], s=t["s"], b=t["b"], bias=t["bias"],
                    core=t["core"], scaling=0.5)
    _check_op(lambda **kw: svk.sv_linear(**kw, backend="triton"), reference.sv_linear,
              leaves, views, build, f"sv_linear {strategy} {kind}")


@pytest.mark.parametrize("kind", ["sliced", "expanded"])
@pytest.mark.parametrize("fuse_t", [True, False])
def test_sv_mixture_linear_strided_vectors(monkeypatch, fuse_t, kind):
    """gate_in, gate_out and bias as views (x_at_router and its backward read them through
    strides now, instead of copying them). An expanded gate_out gives every head the same
    logit (a constant router, whose gradient is exactly zero and has no relative error to
    compare), so gate_out is sliced in both cases and expanded in a forward check."""
    import svk.kernels.x_at_router as router
    monkeypatch.setattr(router, "_fuse_t_by_default", lambda x: fuse_t)
    m, k, n, r, heads = 9, 24, 20, 19, 3
    gate_in, gi_view = _vector(kind, r)
    gate_out, go_view = _vector("sliced", heads)
    bias, bias_view = _vector(kind, n)
    leaves = dict(x=_leaf(m, k), weight=_leaf(n, k, scale=k ** -0.5),
                  a=_leaf(r, k, scale=k ** -0.5), lambdas=_leaf(heads, r), gate_in=gate_in,
                  gate_out=gate_out, b=_leaf(n, r), bias=bias)
    views = dict(gate_in=gi_view, gate_out=go_view, bias=bias_view)

    def build(t):
        return dict(x=t["x"], weight=t["weight"], a=t["a"], lambdas=t["lambdas"],
                    gate_in=t["gate_in"], gate_out=t["gate_out"], b=t["b"], bias=t["bias"],
                    scaling=0.5)
    _check_op(lambda **kw: svk.sv_mixture_linear(**kw, backend="triton"),
              reference.sv_mixture_linear, leaves, views, build, f"sv_mixture_linear {kind}")
    if kind == "expanded":
        args = build({**leaves, "gate_out": _leaf(1).expand(heads), "gate_in": gi_view(gate_in),
                      "bias": bias_view(bias)})
        y = svk.sv_mixture_linear(**args, backend="triton")
        y64 = reference.sv_mixture_linear(**{k: v.double() if torch.is_tensor(v) else v
                                             for k, v in args.items()})
        y32 = reference.sv_mixture_linear(**args)
        assert_close_to_oracle(y, y64, y32, torch.float32, "y, expanded gate_out")


@pytest.mark.parametrize("kind", ["sliced", "expanded"])
@pytest.mark.parametrize("strategy", ["fused", "one_pass"])
def test_sv_bank_linear_strided_vectors(monkeypatch, strategy, kind):
    _force_strategy(monkeypatch, strategy)
    m, k, n, r, adapters = 9, 24, 20, 5, 3
    s, s_view = _vector(kind, r)
    bias, bias_view = _vector(kind, n)
    ids = torch.tensor([0, 2, -1, 1, 1, 0, -1, 2, 0], device=DEVICE)
    leaves = dict(x=_leaf(m, k), weight=_leaf(n, k, scale=k ** -0.5),
                  a=_leaf(r, k, scale=k ** -0.5), s=s, b=_leaf(n, r), bias=bias,
                  cores=_leaf(adapters, r, r))
    views = dict(s=s_view, bias=bias_view)

    def build(t):
        return dict(x=t["x"], weight=t["weight"], a=t["a"], s=t["s"], b=t["b"], bias=t["bias"],
                    cores=t["cores"], adapter_ids=ids, scaling=0.5)
    _check_op(lambda **kw: svk.sv_bank_linear(**kw, backend="triton"), reference.sv_bank_linear,
              leaves, views, build, f"sv_bank_linear {strategy} {kind}")


@pytest.mark.parametrize("kind", ["sliced", "expanded"])
def test_gather_core_strided_s(kind):
    """The bank's gathered r×r step on its own, with a strided s (the backward's launch)."""
    from svk.kernels.gather_core import gather_core
    r = 6
    s, view = _vector(kind, r)
    p, cores = _leaf(7, r), _leaf(3, r, r)
    ids = torch.tensor([0, 1, 2, -1, 2, 1, 0], device=DEVICE)
    for transpose in (False, True):
        u = gather_core(p, cores, ids, s=view(s), transpose=transpose)
        c = cores.double()[ids.clamp_min(0)] * (ids >= 0).double()[:, None, None]
        c = c if transpose else c.transpose(1, 2)
        oracle = torch.bmm((p.double() * view(s).double())[:, None, :], c)[:, 0]
        torch.testing.assert_close(u.double(), oracle, rtol=1e-5, atol=1e-5)


# ---- item 4: the fp32_precision API ---------------------------------------------------------

@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="torch < 2.9 has no fp32_precision API")
def test_fp32_precision_api_set_does_not_break_fp32_calls():
    """Issue 13.4: once fp32_precision is set (transformers does), torch ≥ 2.9 raises on a read
    of allow_tf32; dot_precision read it on every fp32 launch."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert _common._tf32_allowed()
        x, w, a, s, b = _leaf(5, 16), _leaf(8, 16), _leaf(3, 16), _leaf(3), _leaf(8, 3)
        y = svk.sv_linear(x, w, a, s, b, backend="triton")
        assert y.shape == (5, 8) and torch.isfinite(y).all()
        assert _common.dot_precision(torch.bfloat16) == "ieee"
        matmul.fp32_precision = "ieee"
        assert not _common._tf32_allowed()
        assert _common.dot_precision(torch.float32) == "ieee"
    finally:
        matmul.fp32_precision = before


# ---- item 5: one device per launch, and the launch runs on it -------------------------------

def test_launcher_names_the_tensor_on_another_device():
    from svk.kernels import x_at, xw_plus_ub
    x, a = _leaf(4, 16), _leaf(3, 16)
    with pytest.raises(ValueError, match=r"\ba\b is on meta"):
        x_at(x, a.to("meta"))
    with pytest.raises(ValueError, match="bias is on meta"):
        xw_plus_ub(x, _leaf(8, 16), bias=_leaf(8).to("meta"))


class _OnDevice:
    def __init__(self, device):
        self.device = torch.device(device)


def test_launch_switches_to_the_tensors_gpu(monkeypatch):
    """Issue 13.5: a layer on cuda:1 while cuda:0 is current (device_map="auto") must launch
    on cuda:1; the guard is a context only when the device differs."""
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = _common.check_device(_OnDevice("cuda:1"), a=_OnDevice("cuda:1"), s=None)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_common.check_device(_OnDevice("cuda:0"), a=_OnDevice("cuda:0")),
                      contextlib.nullcontext)
    with pytest.raises(ValueError, match="core is on cuda:0"):
        _common.check_device(_OnDevice("cuda:1"), core=_OnDevice("cuda:0"))
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        _common.check_device(_OnDevice("cpu"))


# ---- item 6: autotune keys, capture, tuning files -------------------------------------------

def test_every_kernel_is_registered_and_keys_every_launcher_constexpr():
    """Issue 13.6: a config tuned for one variant (no bias, no core, a transposed operand,
    TF32) was reused for another; gather_core was not keyed on the rows at all."""
    assert set(_tuning.KERNELS) == {
        "_x_at_kernel", "_xw_plus_ub_kernel", "_x_at_router_kernel", "_x_at_router_bwd_kernel",
        "_x_at_gather_core_kernel", "_xw_plus_xa_gather_core_b_kernel", "_gather_core_kernel"}
    for name, kernel in _tuning.KERNELS.items():
        assert isinstance(kernel.cache, _tuning.TuningCache), name
        params = inspect.signature(kernel.base_fn).parameters.values()
        constexprs = {p.name for p in params if p.annotation in (tl.constexpr, "tl.constexpr")}
        # The config names are the same under the interpreter's single config as on a GPU.
        tuned = {k for c in kernel.configs for k in c.kwargs}
        assert not constexprs - tuned - set(kernel.keys), (name, constexprs - tuned)
    assert "M_BUCKET" in _tuning.KERNELS["_gather_core_kernel"].keys
    for flag in ("HAS_BIAS", "HAS_CORE", "HAS_S", "W_TRANSPOSED", "V_TRANSPOSED",
                 "DOT_PRECISION", "STORE_T"):
        assert flag in _tuning.KERNELS["_xw_plus_ub_kernel"].keys
    for flag in ("HAS_S", "HAS_CORE", "WRITE_U", "A_TRANSPOSED", "DOT_PRECISION"):
        assert flag in _tuning.KERNELS["_x_at_kernel"].keys
    # Issue 16.4: a config tuned without the in-kernel dropout mask (Philox in the K loop of
    # one pass) is not the best one with it, nor the other way round.
    for name in ("_x_at_kernel", "_xw_plus_ub_kernel", "_x_at_router_kernel"):
        assert "DROPOUT" in _tuning.KERNELS[name].keys, name


@triton.jit
def _scale_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < N) * 2, mask=offs < N)


def _two_config_kernel(monkeypatch):
    """A tiny autotuned kernel with two configs (the interpreter's own kernels have one, so
    the autotuner never consults its cache for them), registered like svk's."""
    monkeypatch.setattr(_tuning, "KERNELS", {})
    kernel = triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})],
                             key=["N"])(_scale_kernel)
    return _tuning.register(kernel)


def _launch(kernel, n=40):
    x = torch.arange(n, dtype=torch.float32, device=DEVICE)
    y = torch.empty_like(x)
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, n)
    return x, y


@pytest.fixture
def clean_tuning(monkeypatch):
    monkeypatch.delenv("SVK_TUNING_FILE", raising=False)
    _tuning.clear()
    yield
    _tuning.clear()


@pytest.mark.skipif(ON_GPU, reason="fakes a capture; on a GPU see test_gpu")
def test_capture_refuses_to_autotune_and_names_warmup(monkeypatch, clean_tuning, tmp_path):
    kernel = _two_config_kernel(monkeypatch)
    key = (40, "torch.float32", "torch.float32")
    assert _tuning.needs_tuning(kernel, key)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"svk\.warmup"):
        _launch(kernel)
    # A pinned config for the key: the launch runs with it, capture or not, no benchmark.
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"format": _tuning.FORMAT, "entries": [
        {"device": "cpu", "kernel": "_scale_kernel", "key": list(key),
         "config": {"kwargs": {"BLOCK": 32}, "num_warps": 4, "num_stages": 2}}]}))
    assert svk.warmup.load_tuning(path) == 1
    assert not _tuning.needs_tuning(kernel, key)
    x, y = _launch(kernel)
    torch.testing.assert_close(y, 2 * x)
    assert kernel.best_config.kwargs == {"BLOCK": 32}
    # Another size is another key: still refused inside the capture.
    with pytest.raises(RuntimeError, match="no tuned config"):
        _launch(kernel, n=17)


def test_tuning_file_round_trip(monkeypatch, clean_tuning, tmp_path):
    kernel = _two_config_kernel(monkeypatch)
    key = (40, "torch.float32", "torch.float32")
    kernel.cache[key] = triton.Config({"BLOCK": 16}, num_warps=2, num_stages=1)  # "tuned"
    path = tmp_path / "sub" / "tuning.json"
    assert svk.warmup.save_tuning(path) == 1
    data = json.loads(path.read_text())
    assert data["format"] == _tuning.FORMAT and data["entries"][0]["key"] == list(key)
    _tuning.clear()
    assert _tuning.needs_tuning(kernel, key)
    # SVK_TUNING_FILE is read at the first launch (clear() stands for a new process).
    monkeypatch.setenv("SVK_TUNING_FILE", str(path))
    _tuning.clear()
    assert not _tuning.needs_tuning(kernel, key)
    _launch(kernel)
    config = kernel.best_config
    assert (config.kwargs, config.num_warps, config.num_stages) == ({"BLOCK": 16}, 2, 1)
    # New results are written back to SVK_TUNING_FILE, next to the old ones.
    kernel.cache[(17, "torch.float32", "torch.float32")] = triton.Config({"BLOCK": 32})
    assert len(json.loads(path.read_text())["entries"]) == 2


def test_bad_tuning_files_name_the_file(tmp_path, clean_tuning):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        svk.warmup.load_tuning(bad)
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="svk.warmup.save_tuning"):
        svk.warmup.load_tuning(bad)
    with pytest.raises(ValueError, match="missing.json"):
        svk.warmup.load_tuning(tmp_path / "missing.json")


# ---- svk.warmup ------------------------------------------------------------------------------

class _Adapted(torch.nn.Module):
    """A frozen linear layer with a LoRA-XS adapter through the public op."""

    def __init__(self, k=16, n=12, r=4):
        super().__init__()
        self.weight = torch.nn.Parameter(_leaf(n, k), requires_grad=False)
        self.a = torch.nn.Parameter(_leaf(r, k), requires_grad=False)
        self.s = torch.nn.Parameter(_leaf(r), requires_grad=False)
        self.b = torch.nn.Parameter(_leaf(n, r), requires_grad=False)
        self.core = torch.nn.Parameter(_leaf(r, r))

    def forward(self, x):
        return svk.sv_linear(x, self.weight, self.a, self.s, self.b, core=self.core)


def test_warmup_runs_each_shape_and_leaves_the_model_as_it_was():
    """On CPU nothing tunes: warmup runs the model at each shape (forward and backward), and
    leaves gradients and the random state as they were."""
    model = _Adapted().to(DEVICE)
    seen = []
    hook = model.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.full_like(p, 7.0)
    rng = torch.get_rng_state()
    svk.warmup(model, batch_sizes=[1, 3], seq_lens=[None, 5], backward=True)
    hook.remove()
    assert seen == [(1, 16), (1, 5, 16), (3, 16), (3, 5, 16)]
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in params)
    assert torch.equal(torch.get_rng_state(), rng)

    calls = []
    svk.warmup(lambda batch, seq: calls.append((batch, seq, torch.is_grad_enabled())),
               batch_sizes=[2], seq_lens=[1, 4])
    assert calls == [(2, 1, False), (2, 4, False)]


def test_warmup_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module or a callable"):
        svk.warmup(3)
    with pytest.raises(ValueError, match="batch_sizes"):
        svk.warmup(lambda b, s: None, batch_sizes=[0])


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_gpu_warmup_then_cuda_graph_capture(tmp_path, clean_tuning):
    """Warmed up at the shape, a decode step captures in a CUDA graph (no tuning inside it)
    and replays right; the tuned configs go to a file that pins them."""
    model = _Adapted(k=96, n=80, r=8).cuda()
    svk.warmup(model, batch_sizes=[3], seq_lens=[None], save=tmp_path / "tuning.json")
    assert json.loads((tmp_path / "tuning.json").read_text())["entries"] or not _common.AUTOTUNE
    x = torch.randn(3, 96, device="cuda")
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = model(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(y, model(x))
