"""Timing and memory helpers shared by the benchmark files.

CPU: pytest-benchmark's own timer (median over rounds). CUDA: the same, with a synchronise in
each round, plus `triton.testing.do_bench` (median, p20, p80 in ms) recorded in extra_info,
which the results table prefers. Every result carries provider, shape, dtype, device and
versions in `benchmark.extra_info`.
"""
import os
import platform

import pytest
import torch


def median_ms(bench):
    """A result's median in ms: do_bench's on CUDA (extra_info), pytest-benchmark's else."""
    return bench["extra_info"].get("median_ms", bench["stats"]["median"] * 1e3)


def force_strategy(strategy):
    """Sets (None: clears) SVK_STRATEGY and makes svk read it again: svk reads its settings
    once per process (svk.ops._dispatch.reload_settings; older versions read the variable on
    every call, hence the fallback)."""
    if strategy is None:
        os.environ.pop("SVK_STRATEGY", None)
    else:
        os.environ["SVK_STRATEGY"] = strategy
    from svk.ops import _dispatch
    getattr(_dispatch, "reload_settings", lambda: None)()


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


# Interleaved timing (host-overhead and decode families) ---------------------------------------

def quantile(values, q):
    """The q-quantile (0 ≤ q ≤ 1) of values, linearly interpolated (numpy's default rule)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("quantile of no values")
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def interleaved(fns, *, calls, rounds, warmup=1, sync=None, context=None):
    """Seconds per call of each fn in `fns` (name -> callable), one list entry per round.

    Every round times a batch of `calls` calls (an int, or a count per name) of each provider
    in turn, in an order rotated
    from round to round, so that a slow spell of a shared machine lands on every provider
    rather than on whichever ran last; the median over rounds is then a same-run comparison.
    Per-call times of a few µs cannot be timed one call at a time (the timer's own cost and
    resolution are of that order), hence batches. The garbage collector is off inside a batch;
    between batches it collects the youngest generation, so that no provider pays for
    another's garbage (a full collection takes ~0.4 s once torch and transformers are loaded:
    it runs once, before the first round). `context`
    (e.g. torch.no_grad) is entered once around each batch, as a model's whole forward is.
    """
    import contextlib
    import gc
    import time
    names = list(fns)
    count = calls if isinstance(calls, dict) else dict.fromkeys(names, calls)
    for _ in range(warmup):
        for name in names:
            with context() if context is not None else contextlib.nullcontext():
                fns[name]()
    times = {name: [] for name in names}
    enabled = gc.isenabled()
    gc.collect()
    try:
        for round_ in range(rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                fn = fns[name]
                gc.collect(0)
                gc.disable()
                with context() if context is not None else contextlib.nullcontext():
                    start = time.perf_counter()
                    for _ in range(count[name]):
                        fn()
                    if sync is not None:
                        sync()
                    elapsed = time.perf_counter() - start
                times[name].append(elapsed / count[name])
                gc.enable()
    finally:
        if enabled:
            gc.enable()
    return times


def calls_for(fns, batch_s, *, low=10, high=5000, context=None):
    """Calls per batch for each fn so that a batch lasts about batch_s seconds (from the median
    of 5 single calls after one warm-up call): a µs-long call needs thousands per batch to
    rise above the timer and the scheduler, a ms-long one a few dozen."""
    import contextlib
    import time
    out = {}
    for name, fn in fns.items():
        with context() if context is not None else contextlib.nullcontext():
            fn()
            singles = []
            for _ in range(5):
                start = time.perf_counter()
                fn()
                singles.append(time.perf_counter() - start)
        out[name] = int(min(high, max(low, batch_s / quantile(singles, 0.5))))
    return out


def as_result(name, group, seconds, **extra):
    """A timing as a pytest-benchmark-shaped result (the JSON's schema): stats in seconds,
    extra_info with median_ms, p20_ms and p80_ms (the spread the summary reports)."""
    ms = [s * 1e3 for s in seconds]
    median = quantile(seconds, 0.5)
    stats = {"median": median, "min": min(seconds), "max": max(seconds), "rounds": len(seconds),
             "q1": quantile(seconds, 0.25), "q3": quantile(seconds, 0.75)}
    stats["iqr"] = stats["q3"] - stats["q1"]
    return {"name": name, "group": group, "stats": stats,
            "extra_info": dict(extra, median_ms=median * 1e3, p20_ms=quantile(ms, 0.2),
                               p80_ms=quantile(ms, 0.8))}


def measure_training_step(benchmark, model, device, *, provider, rounds, **info):
    """One AdamW training step of a causal LM on fixed token ids (the model benchmarks'
    case): times it through `measure`, with the trainable count, the bytes the forward saves
    for backward and the transformers/peft versions in extra_info. info must hold `tokens`
    as (batch, sequence)."""
    import transformers
    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    batch, sequence = info.pop("tokens")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 1024, (batch, sequence), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))

    def forward():
        return model(input_ids=ids, labels=ids).loss

    def step():
        forward().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    held = list(model.parameters()) + [ids]
    measure(benchmark, step, device, provider=provider, rounds=rounds,
            tokens=batch * sequence, trainable=sum(p.numel() for p in params),
            saved_bytes=saved_bytes(forward, exclude=held), peft=peft_version,
            transformers=transformers.__version__, **info)


# A CPU family (issue 12's targets are CPU ratios): on a CUDA machine it would only spend a GPU
# session's minutes on the host's CPU, so it runs there only when asked. `pytestmark = CPU_FAMILY`.
CPU_FAMILY = pytest.mark.skipif(
    torch.cuda.is_available() and os.environ.get("SVK_BENCH_CPU_FAMILIES") != "1",
    reason="CPU family; SVK_BENCH_CPU_FAMILIES=1 runs it on a CUDA machine too")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread (SVK_BENCH_THREADS changes it), as issue 12's targets are stated, and a
    shared machine's threads swamp µs-long calls; imported by a module, it applies to it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SVK_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(previous)
