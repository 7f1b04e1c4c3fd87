"""The two floors of a benchmark case, measured in the same run as the case itself.

A case's work is counted once, from its algebra (the FLOPs and the bytes any implementation
must spend, whatever it fuses), and turned into two lower bounds on its time:

    FLOP floor = FLOPs / the device's matrix rate (a large GEMM in the case's dtype)
    byte floor = bytes / the device's copy bandwidth (a large device-to-device copy)

Both rates are measured once per pytest session on the same device and dtype. The results
table reports each provider's time as a multiple of the larger floor ("× floor"): 1.0 is the
hardware limit as far as these two numbers can tell; a kernel far above both is neither
compute- nor bandwidth-bound and has overhead (launches, poor tiling) to remove.

Bytes count every operand read once and every output written once; the FLOPs count multiply
and add as two. Small vectors (s, bias, gates) are left out of both.
"""
import functools
import time

import torch


def _best_ms(fn, device, repeat):
    """The fastest of several runs: a floor needs the best rate the device shows, not a
    typical one (on a shared CPU the median carries other processes' load)."""
    fn()
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, return_mode="min")
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


@functools.lru_cache(maxsize=None)
def rates(device_type, dtype_name, threads):
    """(matrix rate in TFLOP/s, copy bandwidth in GB/s), measured now on this device with
    this many CPU threads (some benchmark modules run single-threaded)."""
    device = torch.device(device_type)
    dtype = getattr(torch, dtype_name)
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    gemm_ms = _best_ms(lambda: a @ b, device, repeat=9)
    numel = (1 << 28 if device.type == "cuda" else 1 << 25) // a.element_size()
    src = torch.empty(numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy_ms = _best_ms(lambda: dst.copy_(src), device, repeat=9)
    return 2 * n ** 3 / gemm_ms / 1e9, 2 * src.nbytes / copy_ms / 1e6


def floors(flops, nbytes, device, dtype):
    """extra_info entries: the case's work, the two rates and the two floors in ms."""
    tflops, gbps = rates(device.type, str(dtype).replace("torch.", ""),
                         torch.get_num_threads() if device.type == "cpu" else 0)
    return dict(flops=flops, bytes=nbytes, matrix_tflops=tflops, copy_gbps=gbps,
                flop_floor_ms=flops / tflops / 1e9, byte_floor_ms=nbytes / gbps / 1e6)


def linear_adapter_work(m, k, n, r, elem, *, mode, core=False, grads=(), out_scale=False,
                        cores_read=0):
    """(FLOPs, bytes) of y = x·Wᵀ + ((x·aᵀ ⊙ s)·coreᵀ)·bᵀ (⊙ out_scale), W frozen, x needing
    its gradient, the adapter tensors in fp32.

    fwd: x·Wᵀ (2mkn), t = x·aᵀ (2mkr), the core (2mr²), u·bᵀ (2mnr); reads x, W, a, b, writes
    y. bwd adds dx = dy·W (2mkn) + dt·a (2mkr), du = dy·b_eff (2mnr) and back through the core
    (2mr²), reading dy and W and writing dx; da needs x again (2mkr and a re-read of x),
    dcore = duᵀ·(t ⊙ s) 2mr², db = dyᵀ·u (2mnr), and out_scale's gradient Σ dy ⊙ (u·bᵀ)
    costs dyᵀ·u too (2mnr, shared with db). cores_read: bytes of gathered cores.
    """
    flops = 2 * m * k * n + 2 * m * k * r + 2 * m * n * r + (2 * m * r * r if core else 0)
    nbytes = (m * k + n * k + m * n) * elem + (r * k + n * r) * 4 + cores_read
    if mode == "fwd+bwd":
        flops += 2 * m * k * n + 2 * m * k * r + 2 * m * n * r + (2 * m * r * r if core else 0)
        nbytes += (m * n + n * k + m * k) * elem + (r * k + n * r) * 4
        if "a" in grads:
            flops += 2 * m * k * r
            nbytes += m * k * elem
        if "core" in grads:
            flops += 2 * m * r * r
        if "b" in grads or out_scale:
            flops += 2 * m * n * r
    return flops, nbytes
