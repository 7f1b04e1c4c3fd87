"""Backend and strategy resolution shared by the ops.

backend="auto" runs PyTorch on CPU tensors; on CUDA tensors it runs whichever of the
PyTorch/cuBLAS composition and the Triton strategies was fastest for that shape bucket, dtypes
and flags when first timed on the device (StrategyTuner: in memory and on disk, pinnable).
SVK_BACKEND (auto|triton|torch) changes what "auto" means and SVK_STRATEGY
(fused|one_pass|merged) forces the Triton strategy. Both are read once, at import
(`reload_settings()` reads them again): nothing reads the environment on a call's hot path.
A forced backend that cannot run raises; it never falls back silently.
"""
import json
import os
import pathlib
import threading

import torch

BACKENDS = ("auto", "triton", "torch")
STRATEGIES = ("fused", "one_pass", "merged")
SIXTEEN_BIT = (torch.float16, torch.bfloat16)

try:
    import triton  # noqa: F401

    from svk import kernels as _kernels  # noqa: F401
    TRITON_ERROR = None
except Exception as error:  # no Triton wheel for this platform, or a broken install
    TRITON_ERROR = f"{type(error).__name__}: {error}"


class _Settings:
    """The environment, read once. An invalid value is kept with its error and raised by the
    first call that needs it (an import never fails on a typo in the environment)."""

    __slots__ = ("backend", "backend_error", "strategy", "strategy_error", "interpret")

    def read(self):
        self.interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
        self.backend = os.environ.get("SVK_BACKEND", "auto")
        self.backend_error = (None if self.backend in BACKENDS else
                              f"SVK_BACKEND must be one of {BACKENDS}, got {self.backend!r}")
        self.strategy = os.environ.get("SVK_STRATEGY") or None
        self.strategy_error = (None if self.strategy in (None,) + STRATEGIES else
                               f"SVK_STRATEGY must be one of {STRATEGIES}, got {self.strategy!r}")
        return self


SETTINGS = _Settings().read()


def reload_settings():
    """Reads SVK_BACKEND, SVK_STRATEGY and TRITON_INTERPRET again (after changing them in
    os.environ within a running process, e.g. in tests or a tuning script)."""
    SETTINGS.read()
    TUNER.clear_memory()


def interpreter_on():
    return SETTINGS.interpret


def triton_usable(device):
    """(ok, reason) for running Triton kernels on tensors of `device`."""
    if TRITON_ERROR is not None:
        return False, f"Triton could not be imported ({TRITON_ERROR})"
    if device.type == "cuda" or interpreter_on():
        return True, ""
    return False, (f"Triton kernels need CUDA tensors; the tensors are on {device}. "
                   "Set TRITON_INTERPRET=1 "
                   "before importing svk to run them on CPU through Triton's interpreter")


def resolve_backend(backend, x):
    """"torch" or "triton" for this call. A few comparisons on the common paths."""
    if backend == "auto":
        if SETTINGS.backend != "auto":
            if SETTINGS.backend_error:
                raise ValueError(SETTINGS.backend_error)
            backend = SETTINGS.backend
        elif x.device.type == "cuda" and TRITON_ERROR is None:
            return "triton"
        else:
            return "torch"
    if backend == "torch":
        return backend
    if backend != "triton":
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    ok, reason = triton_usable(x.device)
    if not ok:
        raise RuntimeError(f"backend='triton' cannot run: {reason}")
    if x.dtype == torch.float64:
        raise TypeError("x has dtype torch.float64, which only backend='torch' supports")
    return backend


def forced_strategy():
    if SETTINGS.strategy_error:
        raise ValueError(SETTINGS.strategy_error)
    return SETTINGS.strategy


# Cut-offs measured per GPU by benchmarks/tune_strategy.py, keyed by torch's device name.
CUTOFFS_FILE = pathlib.Path(__file__).with_name("strategy_cutoffs.json")
# Until a GPU has been measured: one pass up to 256 rows, merged once M·(in+out) ≥ 4·in·out
# (from FLOP counting, see choose_strategy).
DEFAULT_CUTOFFS = {"one_pass_max_rows": 256, "merged_min_ratio": 4.0}


# Read once at import: nothing below may do I/O, since torch.compile traces choose_strategy.
MEASURED = json.loads(CUTOFFS_FILE.read_text()).get("devices", {})
_LIMITS = {}


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


# What torch.compiler.assume_constant_result does, without its import of torch._dynamo,
# which costs seconds that `import svk` must not pay.
_limits._dynamo_marked_constant = True


def choose_strategy(m, in_features, out_features, padded_rank, max_epilogue_rank,
                    device=torch.device("cpu"), weight_dtype=None):
    """Fused vs one-pass vs merged for the Triton backend, by rule (the StrategyTuner times
    them instead where it can).

    one_pass: one launch, x read once; wins where launch latency and the second read of x
    dominate (decode, small M). merged: builds W_eff once (2·out·in·r FLOPs, independent of M)
    and then runs one plain GEMM; it could win once the fused adapter's 2·M·r·(in+out) FLOPs
    exceed that, i.e. for M·(in+out) well above in·out. It is never chosen for 16-bit weights:
    rounding W + ΔW to fp16/bf16 drops every entry of ΔW below half an ulp of W (DESIGN §3).
    """
    forced = forced_strategy()
    if forced == "one_pass" and padded_rank > max_epilogue_rank:
        raise ValueError(f"SVK_STRATEGY=one_pass needs rank ≤ {max_epilogue_rank}")
    if forced == "merged" and weight_dtype in SIXTEEN_BIT:
        raise ValueError(f"SVK_STRATEGY=merged cannot run a {weight_dtype} weight: rounding "
                         "W + ΔW to 16 bits drops the adapter's small entries; use fused or "
                         "one_pass")
    if forced is not None:
        return forced
    one_pass_max_rows, ratio = _limits(device.type, device.index or 0)
    if m <= one_pass_max_rows and padded_rank <= max_epilogue_rank:
        return "one_pass"
    # ratio None: merged never won where it was measured.
    if (ratio is not None and weight_dtype not in SIXTEEN_BIT
            and m * (in_features + out_features) >= ratio * in_features * out_features):
        return "merged"
    return "fused"


def dropout_strategy(strategy):
    """The strategy for a call with adapter dropout, given the one chosen without it. Every
    strategy draws the mask in-kernel (Philox from a seed, regenerated in backward) except
    merged: W_eff folds the adapter into the weight the base GEMM reads with x, so there is
    no adapter input to drop. A merged choice (the rule's, or SVK_STRATEGY=merged) runs as
    fused, the same arithmetic on the same weights, since merging is a speed choice only."""
    return "fused" if strategy == "merged" else strategy


def m_bucket(m):
    """Row counts bucketed to powers of two (up to 65 536) for choices keyed by shape."""
    return 1 << min(max(m - 1, 0).bit_length(), 16)


def autocast_dtype(x):
    """The autocast dtype for x's device, or None when autocast is off (or x is not a tensor
    on a device autocast knows, e.g. meta)."""
    device_type = x.device.type if isinstance(x, torch.Tensor) else None
    if device_type not in ("cuda", "cpu", "xpu", "mps") or not torch.is_autocast_enabled(
            device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_base(x, weight, bias):
    """Under torch.autocast the base layer runs in the autocast dtype, as nn.Linear would;
    adapter tensors keep their own dtype (the kernels cast their tiles). Runs before the
    argument checks, so anything that is not a floating tensor is left for them to report."""
    dtype = autocast_dtype(x)
    if dtype is None:
        return x, weight, bias

    def cast(value):
        floating = isinstance(value, torch.Tensor) and value.is_floating_point()
        return value.to(dtype) if floating and value.dtype not in (dtype, torch.float64) else value
    return cast(x), cast(weight), cast(bias)


# ---- choosing by measurement --------------------------------------------------------------

class StrategyTuner:
    """Picks, per key (op, shape bucket, dtypes, flags), the fastest candidate strategy by
    timing each once on the device, and remembers the winner in memory and in a JSON file
    keyed by device name and library versions, so later processes (and every DDP rank) make
    the same choice without timing.

    timer(run) -> seconds for one call of run(); the default times CUDA launches with events
    (median of 5 after a warm-up). Tests inject a fake timer. SVK_STRATEGY still pins the
    choice, and pin(key, strategy) pins one key. A call inside a CUDA-graph capture that
    would need timing raises: warm up first (svk.warmup) so every key is known.
    """

    def __init__(self, path=None, timer=None):
        self.path = pathlib.Path(path) if path is not None else None
        self.timer = timer or _cuda_timer
        self._memory = {}
        self._loaded = False
        self._lock = threading.Lock()

    def clear_memory(self):
        self._memory.clear()
        self._loaded = False

    def _file(self):
        if self.path is not None:
            return self.path
        root = os.environ.get("SVK_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "svk")
        return pathlib.Path(root) / "strategies.json"

    def _scope(self, device):
        import svk
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        triton_version = getattr(globals().get("triton"), "__version__", "none")
        return f"{name}|torch {torch.__version__}|triton {triton_version}|svk {svk.__version__}"

    def _load(self):
        self._loaded = True
        try:
            self._disk = json.loads(self._file().read_text())
        except (OSError, ValueError):
            self._disk = {}

    def lookup(self, key, device):
        if key in self._memory:
            return self._memory[key]
        if not self._loaded:
            self._load()
        found = self._disk.get(self._scope(device), {}).get(key)
        if found is not None:
            self._memory[key] = found
        return found

    def pin(self, key, strategy, device=torch.device("cpu"), *, save=True):
        self._memory[key] = strategy
        if save:
            self._save(key, strategy, device)

    def _save(self, key, strategy, device):
        with self._lock:
            if not self._loaded:
                self._load()
            self._disk.setdefault(self._scope(device), {})[key] = strategy
            path = self._file()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(self._disk, indent=1, sort_keys=True))
                os.replace(tmp, path)
            except OSError:
                pass        # a read-only cache directory costs a re-timing next process

    def choose(self, key, device, candidates):
        """candidates: {strategy: run}, run() executing the op's forward once."""
        found = self.lookup(key, device)
        if found in candidates:
            return found
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"svk has not chosen a strategy for {key} yet and cannot time candidates "
                "inside a CUDA-graph capture: call svk.warmup(model, batch_sizes=...) (or run "
                "the step once) before capturing")
        with torch.no_grad():
            times = {name: self.timer(run) for name, run in candidates.items()}
        best = min(times, key=times.get)
        self.pin(key, best, device)
        return best


def _cuda_timer(run, repeats=5):
    run()                                  # warm-up: compiles and autotunes
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2] / 1e3


TUNER = StrategyTuner()


def measured_choice(device):
    """Whether auto dispatch on this device times candidates (CUDA, not while compiling)."""
    return device.type == "cuda" and not torch.compiler.is_compiling()
