"""Timing and memory helpers shared by the benchmark files.

CPU: pytest-benchmark's own timer (median over rounds). CUDA: the same, with a synchronise in
each round, plus `triton.testing.do_bench` (median, p20, p80 in ms) recorded in extra_info,
which the results table prefers. Every result carries provider, shape, dtype, device and
versions in `benchmark.extra_info`.
"""
import platform

import torch


def median_ms(bench):
    """A result's median in ms: do_bench's on CUDA (extra_info), pytest-benchmark's else."""
    return bench["extra_info"].get("median_ms", bench["stats"]["median"] * 1e3)


def floor_ms(extra):
    """The larger of a case's two floors (benchmarks/floors.py), 0 when it counted none."""
    return max(extra.get("flop_floor_ms", 0), extra.get("byte_floor_ms", 0))


def environment(device):
    info = {"device": device.type, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def saved_bytes(fn, exclude=()):
    """Bytes autograd keeps for backward while fn() runs, excluding tensors that share storage
    with `exclude` (inputs and parameters the caller holds anyway)."""
    owned = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in owned and ptr not in seen:
            seen.add(ptr)
            total += tensor.untyped_storage().nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return total


def measure(benchmark, fn, device, *, provider, rounds=None, **info):
    """Times fn with pytest-benchmark (and do_bench on CUDA), records provider and info."""
    benchmark.extra_info.update(environment(device), provider=provider, **info)
    if device.type == "cuda":
        import triton.testing
        median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        benchmark.extra_info.update(median_ms=median, p20_ms=p20, p80_ms=p80)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device) - base

        def synced():
            fn()
            torch.cuda.synchronize(device)
        return benchmark.pedantic(synced, rounds=rounds or 20, warmup_rounds=3)
    return benchmark.pedantic(fn, rounds=rounds or 7, warmup_rounds=1)
