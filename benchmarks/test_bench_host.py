"""Host overhead: per-call time at tiny shapes, where Python and dispatch are the whole cost.

M = 1 row, in = out = 64, r = 8, fp32, one thread (issue 12). At this size the arithmetic
takes well under a microsecond; what is timed is the host work around it: argument checks,
dispatch, autograd bookkeeping. On a GPU the same host time bounds a decode step.

Cases (op level; every provider called with the same tensors):
  sv_linear lora_xs     core (r, r) trains; a, s, b frozen            (LoRA-XS arguments)
  sv_linear sara        a, s, b train; no core                        (SARA arguments)
  sv_mixture_linear     k = 8, 5 heads; lambdas, gate_in, gate_out, out_scale train (Mo-SARA)
  sv_bank_linear        4 adapters' cores, M = 4 rows, one adapter per row (ids 0..3); the
                        cores train in fwd+bwd (several users' adapters in one batch)
Module level:
  LoRAXSLinear          svk.nn.LoRAXSLinear.from_linear(nn.Linear(64, 64), rank=8); the
                        reference is the same module with its op swapped for
                        svk.reference.sv_linear; the base is the nn.Linear
  bank layer            a BankLinear (AdapterBank over one nn.Linear, 4 adapters, M = 4 rows,
                        ids 0..3, inside bank.activate); the reference calls
                        svk.reference.sv_bank_linear on the layer's tensors; no_grad only
Modes: "fwd" (grad mode on, x and the trainable tensors require grad: a training forward),
"fwd no_grad" (the same call under torch.no_grad: inference) and "fwd+bwd" (forward and
torch.autograd.grad of x and the trainable tensors).
Providers: svk (svk.*), reference (svk.reference.*, the same signatures), base (F.linear /
nn.Linear). Each test times its three providers interleaved in one process: ROUNDS rounds of one
batch per provider (benchmarks.utils.interleaved), each batch as many calls as last about
SVK_BENCH_BATCH_MS = 20 ms (benchmarks.utils.calls_for), reported in µs per call with the
p20–p80 spread over rounds.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import svk
from benchmarks.utils import (CPU_FAMILY, as_result, calls_for, environment, interleaved,  # noqa: F401
                              one_thread)
from svk import reference

M, IN, OUT, R, HEADS, ADAPTERS = 1, 64, 64, 8, 5, 4
BATCH_S = float(os.environ.get("SVK_BENCH_BATCH_MS", "20")) / 1e3   # one batch's duration
ROUNDS = int(os.environ.get("SVK_BENCH_ROUNDS", "15"))
DEVICE = torch.device("cpu")   # host overhead: the CPU family (a GPU run adds nothing here)
MODES = ["fwd", "fwd no_grad", "fwd+bwd"]
PROVIDERS = ["svk", "reference", "base"]
pytestmark = CPU_FAMILY


def _rand(g, *shape, scale=1.0, grad=False):
    return (torch.randn(shape, generator=g) * scale).requires_grad_(grad)


def op_case(case):
    """(callables by provider, tensors each provider differentiates) for an op-level case."""
    g = torch.Generator().manual_seed(0)
    rows = ADAPTERS if case == "sv_bank_linear" else M
    x = _rand(g, rows, IN, grad=True)
    weight, bias = _rand(g, OUT, IN, scale=IN ** -0.5), _rand(g, OUT)
    a, b = _rand(g, R, IN, scale=IN ** -0.5), _rand(g, OUT, R, scale=0.1)
    if case in ("sv_linear lora_xs", "sv_linear sara"):
        sara = case.endswith("sara")
        s = _rand(g, R, grad=sara)
        a.requires_grad_(sara)
        b.requires_grad_(sara)
        core = None if sara else _rand(g, R, R, scale=0.1, grad=True)
        trainable = [a, s, b] if sara else [core]
        args, kw = (x, weight, a, s, b), dict(bias=bias, core=core, scaling=2.0)
        fns = {"svk": lambda: svk.sv_linear(*args, **kw),
               "reference": lambda: reference.sv_linear(*args, **kw)}
    elif case == "sv_mixture_linear":
        lambdas, gate_in = _rand(g, HEADS, R, grad=True), _rand(g, R, scale=R ** -0.5, grad=True)
        gate_out, out_scale = _rand(g, HEADS, grad=True), _rand(g, OUT, scale=0.1, grad=True)
        trainable = [lambdas, gate_in, gate_out, out_scale]
        args, kw = (x, weight, a, lambdas, gate_in, gate_out, b), dict(bias=bias,
                                                                       out_scale=out_scale)
        fns = {"svk": lambda: svk.sv_mixture_linear(*args, **kw),
               "reference": lambda: reference.sv_mixture_linear(*args, **kw)}
    elif case == "sv_bank_linear":
        s = _rand(g, R)
        cores = _rand(g, ADAPTERS, R, R, scale=0.1, grad=True)
        ids = torch.arange(ADAPTERS)
        trainable = [cores]
        args, kw = (x, weight, a, s, b, cores, ids), dict(bias=bias, scaling=2.0)
        fns = {"svk": lambda: svk.sv_bank_linear(*args, **kw),
               "reference": lambda: reference.sv_bank_linear(*args, **kw)}
    else:
        raise ValueError(f"unknown case {case!r}")
    fns["base"] = lambda: F.linear(x, weight, bias)
    params = {"svk": [x] + trainable, "reference": [x] + trainable, "base": [x]}
    return fns, params, rows


def module_case(case):
    """(callables by provider, tensors differentiated, rows, bank or None) at module level."""
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT)
    if case == "LoRAXSLinear":
        x = torch.randn(M, IN, requires_grad=True)
        layer = svk.nn.LoRAXSLinear.from_linear(linear, rank=R)
        ref_layer = svk.nn.LoRAXSLinear.from_linear(linear, rank=R)
        ref_layer.load_state_dict(layer.state_dict())
        _check_swap(ref_layer, x)
        ref_layer.op = reference.sv_linear
        fns = {"svk": lambda: layer(x), "reference": lambda: ref_layer(x),
               "base": lambda: linear(x)}
        params = {"svk": [x, layer.core], "reference": [x, ref_layer.core], "base": [x]}
        return fns, params, M, None
    if case == "bank layer":
        model = nn.Sequential()
        model.add_module("proj", linear)
        bank = svk.AdapterBank(model, svk.AdapterConfig(method="lora_xs", rank=R,
                                                        target_modules=["proj"]),
                               capacity=ADAPTERS, progress=False)
        g = torch.Generator().manual_seed(1)
        for k in range(ADAPTERS):
            bank.add(f"user{k}", {"proj.core": torch.randn(R, R, generator=g) * 0.1})
        layer = bank.layers["proj"]
        x = torch.randn(ADAPTERS, IN)
        ids = bank.ids(list(range(ADAPTERS)))

        def ref():
            return reference.sv_bank_linear(x, layer.weight, layer.a, layer.s, layer.b,
                                            layer.cores, ids, bias=layer.bias,
                                            scaling=layer.scaling)
        fns = {"svk": lambda: layer(x), "reference": ref, "base": lambda: linear(x)}
        return fns, None, ADAPTERS, bank
    raise ValueError(f"unknown case {case!r}")


def _check_swap(layer, x):
    """The module must call its `op` attribute, or the reference provider would time svk."""
    seen = []

    def counting(*args, **kw):
        seen.append(1)
        return reference.sv_linear(*args, **kw)
    layer.op = counting
    layer(x)
    if not seen:
        raise AssertionError(f"{type(layer).__name__}.forward no longer calls layer.op; the "
                             "module-level reference needs another way to swap the op")


def _agree(fns, params):
    """svk and the reference compute the same thing (else the timing compares nothing)."""
    with torch.no_grad():
        y, y_ref = fns["svk"](), fns["reference"]()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)   # fp32 sums in another order


def _runner(fn, mode, params, dy):
    if mode == "fwd":
        return fn
    if mode == "fwd no_grad":
        return fn          # interleaved() enters torch.no_grad once around each batch

    def run():
        torch.autograd.grad(fn(), params, dy)
    return run


def _time(svk_results, group, mode, fns, params, rows, *, level, case):
    dy = torch.randn(rows, OUT)
    runs = {p: _runner(fns[p], mode, params and params[p], dy) for p in PROVIDERS}
    context = torch.no_grad if mode == "fwd no_grad" else None
    calls = calls_for(runs, BATCH_S, context=context)
    times = interleaved(runs, calls=calls, rounds=ROUNDS, warmup=2, context=context)
    for provider in PROVIDERS:
        svk_results.append(as_result(
            f"test_host[{group}-{provider}]", group, times[provider], provider=provider,
            family="host", mode=mode, M=rows, in_features=IN, out_features=OUT, rank=R,
            calls_per_round=calls[provider], unit="per call", level=level, case=case,
            short=f"host {'module ' if level == 'module' else ''}{case} {mode}",
            **environment(DEVICE)))


OP_CASES = ["sv_linear lora_xs", "sv_linear sara", "sv_mixture_linear", "sv_bank_linear"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", OP_CASES)
def test_host_op(svk_results, case, mode):
    fns, params, rows = op_case(case)
    _agree(fns, params)
    extra = f" k{R} m{HEADS}" if case == "sv_mixture_linear" else (
        f" {ADAPTERS} adapters" if case == "sv_bank_linear" else "")
    group = f"host {case} {mode} M{rows} in{IN} out{OUT} r{R}{extra}"
    _time(svk_results, group, mode, fns, params, rows, level="op", case=case)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["LoRAXSLinear", "bank layer"])
def test_host_module(svk_results, case, mode):
    if case == "bank layer" and mode != "fwd no_grad":
        pytest.skip("a bank layer serves (its cores are a buffer): no_grad only")
    fns, params, rows, bank = module_case(case)
    group = f"host module {case} {mode} M{rows} in{IN} out{OUT} r{R}"
    if bank is None:
        _agree(fns, params)
        _time(svk_results, group, mode, fns, params, rows, level="module", case=case)
        return
    with bank.activate(list(range(ADAPTERS))):
        _agree(fns, params)
        _time(svk_results, group, mode, fns, params, rows, level="module", case=case)
