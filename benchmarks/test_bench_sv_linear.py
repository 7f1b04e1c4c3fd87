"""sv_linear vs the naive reference and vs the base layer alone (the floor).

Providers, measured side by side in one run: `base` (x·Wᵀ + bias only), `reference`
(svk.reference: the adapter as separate linear maps, every intermediate kept by autograd) and
`svk` (backend auto: PyTorch formulas on CPU, Triton kernels on CUDA; on CUDA also each Triton
strategy forced). Methods: LoRA-XS (only the r×r core trains) and SARA (a, s, b train); x
requires grad, as in a middle layer of a network being fine-tuned.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import svk
from benchmarks.floors import floors, linear_adapter_work
from benchmarks.utils import measure, saved_bytes
from svk import reference

CPU_SHAPES = [(2048, 1024, 1024, 16)]                 # M, in, out, r
CUDA_SHAPES = [(64, 4096, 4096, 16), (4096, 4096, 4096, 16), (4096, 4096, 11008, 64),
               (16384, 4096, 4096, 64)]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SHAPES = CUDA_SHAPES if DEVICE.type == "cuda" else CPU_SHAPES
TRAINABLE = {"lora_xs": ("core",), "sara": ("a", "s", "b")}
PROVIDERS = ["base", "reference", "svk"] + (
    ["svk-fused", "svk-one_pass", "svk-merged"] if DEVICE.type == "cuda" else [])


def layer(m, in_f, out_f, r, method):
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32, scale=1.0, grad=False):
        value = (torch.randn(shape, generator=g) * scale).to(DEVICE, dtype)
        return value.requires_grad_(grad)
    train = TRAINABLE[method]
    return dict(
        x=rand(m, in_f, dtype=DTYPE, grad=True),
        weight=rand(out_f, in_f, dtype=DTYPE, scale=in_f ** -0.5),
        bias=rand(out_f, dtype=DTYPE),
        a=rand(r, in_f, scale=in_f ** -0.5, grad="a" in train),
        s=rand(r, grad="s" in train),
        b=rand(out_f, r, scale=0.1, grad="b" in train),
        core=rand(r, r, scale=0.1, grad="core" in train) if method == "lora_xs" else None,
    )


def forward(provider, t):
    if provider == "base":
        return F.linear(t["x"], t["weight"], t["bias"])
    args = (t["x"], t["weight"], t["a"], t["s"], t["b"])
    kw = dict(bias=t["bias"], core=t["core"], scaling=1.0)
    if provider == "reference":
        return reference.sv_linear(*args, **kw)
    return svk.sv_linear(*args, **kw)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("method", list(TRAINABLE))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-in{}-out{}-r{}".format(*s))
def test_sv_linear(benchmark, svk_strategy, provider, mode, method, shape):
    if "-" in provider:
        svk_strategy(provider.split("-")[1])
        if provider.endswith("one_pass") and shape[3] > 128:
            pytest.skip("one-pass keeps the rank in registers (r ≤ 128)")
    benchmark.group = f"sv_linear {mode} {method} " + "M{} in{} out{} r{}".format(*shape)
    t = layer(*shape, method)
    dy = torch.randn(shape[0], shape[2], device=DEVICE, dtype=DTYPE)
    params = [v for v in t.values() if v is not None and v.requires_grad]
    if provider == "base":
        params = [t["x"]]

    def run():
        if mode == "fwd":
            with torch.no_grad():
                forward(provider, t)
        else:
            y = forward(provider, t)
            torch.autograd.grad(y, params, dy)
    saved = saved_bytes(lambda: forward(provider, t), exclude=list(t.values()))
    m, in_f, out_f, r = shape
    work = linear_adapter_work(m, in_f, out_f, r, t["x"].element_size(), mode=mode,
                               core=method == "lora_xs", grads=TRAINABLE[method])
    measure(benchmark, run, DEVICE, provider=provider, saved_bytes=saved, M=m, in_features=in_f,
            out_features=out_f, rank=r, dtype=str(DTYPE), method=method, mode=mode,
            strategy=os.environ.get("SVK_STRATEGY", "auto"), **floors(*work, DEVICE, DTYPE))
