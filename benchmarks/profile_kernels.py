"""Runs each svk kernel once at DESIGN.md §7's shapes inside a profiler window, for Nsight Compute.

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy --csv \\
        python3 benchmarks/profile_kernels.py          # or: bash benchmarks/gpu.sh profile

Every case runs three times first (autotuning and compilation happen there, outside the
window), then once between cudaProfilerStart and cudaProfilerStop, so ncu sees exactly one
launch of each kernel of the case and none of the autotuner's trial runs. Without ncu the
script just runs the cases and prints their kernels' launch counts (svk.kernels._common.LAUNCHES).

Cases (bf16): sv_linear LoRA-XS forward and backward at 4096 tokens, 4096→4096, r 16 (fused
and one_pass at 64 rows), sv_mixture_linear at 4096 tokens, k 1024, 5 heads, and
sv_bank_linear decode, 16 rows, 100 000 resident adapters, r 16.
"""
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


def _force_strategy(strategy):
    """SVK_STRATEGY set (or cleared) and read again: svk reads its settings once."""
    from svk.ops import _dispatch
    if strategy is None:
        os.environ.pop("SVK_STRATEGY", None)
    else:
        os.environ["SVK_STRATEGY"] = strategy
    getattr(_dispatch, "reload_settings", lambda: None)()


def _cases():
    import svk
    dev, bf16 = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, dtype=torch.float32, grad=False):
        return torch.randn(shape, device=dev, generator=g).to(dtype).requires_grad_(grad)
    h, r, k = 4096, 16, 1024
    w = rand(h, h, dtype=bf16) * h ** -0.5
    a, s, b, core = rand(r, h) * h ** -0.5, rand(r), rand(h, r) * 0.1, rand(r, r, grad=True)

    def lora_xs(m, strategy):
        x, dy = rand(m, h, dtype=bf16, grad=True), rand(m, h, dtype=bf16)

        def run():
            _force_strategy(strategy)
            y = svk.sv_linear(x, w, a, s, b, core=core)
            torch.autograd.grad(y, (x, core), dy)
            _force_strategy(None)
        return run
    ak, bk = rand(k, h) * h ** -0.5, rand(h, k) * k ** -0.5
    lambdas, gate_in, gate_out = rand(5, k, grad=True), rand(k, grad=True), rand(5, grad=True)
    xm, dym = rand(4096, h, dtype=bf16, grad=True), rand(4096, h, dtype=bf16)

    def mixture():
        y = svk.sv_mixture_linear(xm, w, ak, lambdas, gate_in, gate_out, bk)
        torch.autograd.grad(y, (xm, lambdas, gate_in, gate_out), dym)
    cores = rand(100_000, r, r, dtype=bf16) * 0.1
    xd, ids = rand(16, h, dtype=bf16), torch.arange(16, device=dev) * 6007

    def decode():
        with torch.no_grad():
            svk.sv_bank_linear(xd, w, a, s, b, cores, ids)
    return {"sv_linear lora_xs fwd+bwd M4096 fused": lora_xs(4096, "fused"),
            "sv_linear lora_xs fwd+bwd M64 one_pass": lora_xs(64, "one_pass"),
            "sv_mixture_linear fwd+bwd M4096 k1024": mixture,
            "sv_bank_linear decode M16 resident100000": decode}


def main():
    if not torch.cuda.is_available():
        raise SystemExit("profile_kernels runs the Triton kernels: it needs a CUDA GPU")
    from svk.kernels._common import LAUNCHES
    cases = _cases()
    for run in cases.values():
        for _ in range(3):
            run()
    torch.cuda.synchronize()
    cudart = torch.cuda.cudart()
    for name, run in cases.items():
        before = dict(LAUNCHES)
        cudart.cudaProfilerStart()
        run()
        torch.cuda.synchronize()
        cudart.cudaProfilerStop()
        launched = {k: v - before.get(k, 0) for k, v in LAUNCHES.items() if v != before.get(k, 0)}
        print(f"{name}: {launched}", flush=True)


if __name__ == "__main__":
    main()
