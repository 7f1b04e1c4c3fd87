"""Backend resolution shared by the ops.

backend="auto" runs the Triton kernels on CUDA tensors and PyTorch on CPU; the environment
variable SVK_BACKEND (auto|triton|torch) changes what "auto" means. A forced backend that
cannot run raises; it never falls back silently. SVK_STRATEGY (fused|one_pass|merged) forces
the Triton strategy, for benchmarks and tests.
"""
import json
import os
import pathlib

import torch

BACKENDS = ("auto", "triton", "torch")
STRATEGIES = ("fused", "one_pass", "merged")

try:
    import triton  # noqa: F401

    from svk import kernels as _kernels  # noqa: F401
    TRITON_ERROR = None
except Exception as error:  # no Triton wheel for this platform, or a broken install
    TRITON_ERROR = f"{type(error).__name__}: {error}"


def interpreter_on():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device):
    """(ok, reason) for running Triton kernels on tensors of `device`."""
    if TRITON_ERROR is not None:
        return False, f"Triton could not be imported ({TRITON_ERROR})"
    if device.type == "cuda":
        return True, ""
    if interpreter_on():
        return True, ""
    return False, (f"Triton kernels need CUDA tensors; the tensors are on {device}. "
                   "Set TRITON_INTERPRET=1 "
                   "before importing svk to run them on CPU through Triton's interpreter")


def resolve_backend(backend, x):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("SVK_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"SVK_BACKEND must be one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            return "triton" if x.device.type == "cuda" and triton_usable(x.device)[0] else "torch"
    if backend == "triton":
        ok, reason = triton_usable(x.device)
        if not ok:
            raise RuntimeError(f"backend='triton' cannot run: {reason}")
        if x.dtype == torch.float64:
            raise TypeError("x has dtype torch.float64, which only backend='torch' supports")
    return backend


def forced_strategy():
    value = os.environ.get("SVK_STRATEGY")
    if value is not None and value not in STRATEGIES:
        raise ValueError(f"SVK_STRATEGY must be one of {STRATEGIES}, got {value!r}")
    return value


# Cut-offs measured per GPU by benchmarks/tune_strategy.py, keyed by torch's device name.
CUTOFFS_FILE = pathlib.Path(__file__).with_name("strategy_cutoffs.json")
# Until a GPU has been measured: one pass up to 256 rows, merged once M·(in+out) ≥ 4·in·out
# (from FLOP counting, see choose_strategy).
DEFAULT_CUTOFFS = {"one_pass_max_rows": 256, "merged_min_ratio": 4.0}


# Read once at import: nothing below may do I/O, since torch.compile traces choose_strategy.
MEASURED = json.loads(CUTOFFS_FILE.read_text()).get("devices", {})
_LIMITS = {}


@torch.compiler.assume_constant_result
def _limits(device_type, index):
    """(one_pass_max_rows, merged_min_ratio) for a device: measured when
    strategy_cutoffs.json holds its GPU, else DEFAULT_CUTOFFS. A constant to torch.compile
    (it runs once while tracing, never inside the graph)."""
    key = (device_type, index)
    if key not in _LIMITS:
        name = torch.cuda.get_device_name(index) if device_type == "cuda" else device_type
        limits = {**DEFAULT_CUTOFFS, **MEASURED.get(name, {})}
        _LIMITS[key] = (limits["one_pass_max_rows"], limits["merged_min_ratio"])
    return _LIMITS[key]


def choose_strategy(m, in_features, out_features, padded_rank, max_epilogue_rank,
                    device=torch.device("cpu")):
    """Fused vs one-pass vs merged for the Triton backend.

    one_pass: one launch, x read once; wins where launch latency and the second read of x
    dominate (decode, small M). merged: builds W_eff once (2·out·in·r FLOPs, independent of M)
    and then runs one plain GEMM; it wins once the fused adapter's 2·M·r·(in+out) FLOPs exceed
    that, i.e. for M·(in+out) well above in·out. The two cut-offs come from `_limits`:
    measured on that GPU by benchmarks/tune_strategy.py, or provisional defaults.
    """
    forced = forced_strategy()
    if forced == "one_pass" and padded_rank > max_epilogue_rank:
        raise ValueError(f"SVK_STRATEGY=one_pass needs rank ≤ {max_epilogue_rank}")
    if forced is not None:
        return forced
    one_pass_max_rows, ratio = _limits(device.type, device.index or 0)
    if m <= one_pass_max_rows and padded_rank <= max_epilogue_rank:
        return "one_pass"
    # ratio None: merged never won where it was measured.
    if ratio is not None and m * (in_features + out_features) >= ratio * in_features * out_features:
        return "merged"
    return "fused"


def autocast_base(x, weight, bias):
    """Under torch.autocast the base layer runs in the autocast dtype, as nn.Linear would;
    adapter tensors keep their own dtype (the kernels cast their tiles). Runs before the
    argument checks, so anything that is not a floating tensor is left for them to report."""
    if not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(value):
        floating = isinstance(value, torch.Tensor) and value.is_floating_point()
        return value.to(dtype) if floating and value.dtype != torch.float64 else value
    return cast(x), cast(weight), cast(bias)
