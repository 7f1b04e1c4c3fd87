"""sv_mixture_linear (Mo-SARA) vs its per-head reference, a single-core sv_linear and the floor.

Providers, measured side by side in one run (one group per shape and mode):
- `base`: x·Wᵀ + bias alone, the floor;
- `reference`: svk.reference.sv_mixture_linear, Mo-SARA Eq. 5 literally (m per-head (M, out)
  products, every intermediate kept by autograd);
- `sv_linear`: svk.sv_linear with one set of singular values at the same rank k (SiVA/SARA-
  like: s and out_scale train) — what the mixture would cost if the router were free;
- `svk`: svk sv_mixture_linear, backend auto (PyTorch formulas on CPU, Triton on CUDA).

Mo-SARA trains lambdas, gate_in, gate_out and out_scale; a and b are frozen singular vectors;
x requires grad, as in a middle layer of a network being fine-tuned. out_scale is random, not
Mo-SARA's zero init, so no provider can skip work.
"""
import pytest
import torch
import torch.nn.functional as F

from benchmarks.floors import floors, linear_adapter_work
from benchmarks.utils import measure, saved_bytes
from svk import reference
from svk.ops.sv_linear import sv_linear
from svk.ops.sv_mixture_linear import sv_mixture_linear

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CPU_SHAPES = [(512, 512, 512, 128, 5)]                                    # M, in, out, k, m
CUDA_SHAPES = [(512, 4096, 4096, 1024, 5), (4096, 4096, 4096, 1024, 5)]
SHAPES = CUDA_SHAPES if DEVICE.type == "cuda" else CPU_SHAPES
PROVIDERS = ["base", "reference", "sv_linear", "svk"]
TRAINABLE = ("lambdas", "gate_in", "gate_out", "out_scale")


def layer(m, in_f, out_f, k, heads):
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32, scale=1.0, grad=False):
        return (torch.randn(shape, generator=g) * scale).to(DEVICE, dtype).requires_grad_(grad)
    return dict(
        x=rand(m, in_f, dtype=DTYPE, grad=True),
        weight=rand(out_f, in_f, dtype=DTYPE, scale=in_f ** -0.5),
        bias=rand(out_f, dtype=DTYPE),
        a=rand(k, in_f, scale=in_f ** -0.5),
        lambdas=rand(heads, k, grad=True),
        gate_in=rand(k, scale=k ** -0.5, grad=True),
        gate_out=rand(heads, grad=True),
        b=rand(out_f, k, scale=k ** -0.5),
        out_scale=rand(out_f, scale=0.1, grad=True),
        s=rand(k, grad=True),                      # sv_linear's single set of singular values
    )


def forward(provider, t):
    if provider == "base":
        return F.linear(t["x"], t["weight"], t["bias"])
    if provider == "sv_linear":
        return sv_linear(t["x"], t["weight"], t["a"], t["s"], t["b"], bias=t["bias"],
                         out_scale=t["out_scale"])
    fn = reference.sv_mixture_linear if provider == "reference" else sv_mixture_linear
    return fn(t["x"], t["weight"], t["a"], t["lambdas"], t["gate_in"], t["gate_out"], t["b"],
              bias=t["bias"], out_scale=t["out_scale"])


def trainable(provider, t):
    if provider == "base":
        return [t["x"]]
    if provider == "sv_linear":
        return [t["x"], t["s"], t["out_scale"]]
    return [t["x"]] + [t[n] for n in TRAINABLE]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-in{}-out{}-k{}-m{}".format(*s))
def test_sv_mixture_linear(benchmark, provider, mode, shape):
    m, in_f, out_f, k, heads = shape
    benchmark.group = f"sv_mixture_linear {mode} " + "M{} in{} out{} k{} m{}".format(*shape)
    t = layer(*shape)
    dy = torch.randn(m, out_f, device=DEVICE, dtype=DTYPE)
    params = trainable(provider, t)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                forward(provider, t)
        else:
            torch.autograd.grad(forward(provider, t), params, dy)
    saved = saved_bytes(lambda: forward(provider, t), exclude=list(t.values()))
    # CPU timings on a shared machine are noisy: more rounds for a steadier median.
    rounds = None if DEVICE.type == "cuda" else 15
    # The router's (M, k)·(k, m) products are small next to these and are left out.
    work = linear_adapter_work(m, in_f, out_f, k, t["x"].element_size(), mode=mode,
                               out_scale=True)
    measure(benchmark, run, DEVICE, provider=provider, rounds=rounds, saved_bytes=saved, M=m,
            in_features=in_f, out_features=out_f, rank=k, heads=heads, dtype=str(DTYPE),
            mode=mode, method="mosara", **floors(*work, DEVICE, DTYPE))
