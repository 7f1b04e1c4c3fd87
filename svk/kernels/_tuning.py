"""Autotune results that can be kept on disk, pinned, and never measured inside a CUDA graph.

Triton's autotuner benchmarks every config the first time a kernel sees a new key. Two things
go wrong with that on a real deployment:

* inside a CUDA-graph capture the benchmark runs (and synchronises) in the capture and
  breaks it, so a first launch at an unseen key while the stream is capturing raises here
  with a clear error naming svk.warmup, which tunes outside the capture;
* each process (each DDP rank) measures on its own and can pick a different config, so
  results differ between processes. A tuning file pins the choice: every (kernel, key) it
  holds for this GPU is used as it is, never re-measured.

`register` swaps each autotuner's in-memory cache for a TuningCache, the one place where the
autotuner asks "is this key tuned?" (`key not in self.cache`, the same in Triton 3.6 and
3.9), so the key is exactly Triton's own: the values of the kernel's `key` arguments
followed by the dtypes of its tensor arguments.

The file (JSON) is read from SVK_TUNING_FILE at the first launch, or from `load(path)`;
with SVK_TUNING_FILE set, every new result is also written back to it (an atomic replace),
so it doubles as an on-disk cache. `save(path)` writes what this process uses.
"""
import json
import os
import pathlib
import tempfile

import torch
import triton

FORMAT = "svk-tuning-1"

# (device name, kernel name, key) -> config, from the tuning file; these win.
_PINNED = {}
# (device name, kernel name, key) -> config, measured or pinned in this process.
_USED = {}
_STATE = {"env_read": False, "write_back": None}
_DEVICE_NAMES = {}


def _device_name():
    """Name of the device launches go to now (inside the launcher's device guard), "cpu" for
    the interpreter. Configs are per GPU: one tuned for an H100 may not fit an A100."""
    if not torch.cuda.is_available():
        return "cpu"
    index = torch.cuda.current_device()
    if index not in _DEVICE_NAMES:
        _DEVICE_NAMES[index] = torch.cuda.get_device_name(index)
    return _DEVICE_NAMES[index]


def _capturing():
    """Whether the current CUDA stream is capturing a graph (asked on a tuning miss only)."""
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except (RuntimeError, AssertionError):   # a torch built without CUDA cannot capture
        return False


def _config_to_json(config):
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps,
            "num_stages": config.num_stages, "num_ctas": config.num_ctas}


def _config_from_json(value):
    return triton.Config(dict(value["kwargs"]), num_warps=value["num_warps"],
                         num_stages=value["num_stages"], num_ctas=value.get("num_ctas", 1))


def _read_env_once():
    if not _STATE["env_read"]:
        _STATE["env_read"] = True
        path = os.environ.get("SVK_TUNING_FILE")
        if path:
            _STATE["write_back"] = path
            if os.path.exists(path):
                load(path)


class TuningCache(dict):
    """The autotuner's {key: Config}, consulting the pinned configs on a miss and refusing to
    tune while the current CUDA stream is capturing."""

    def __init__(self, kernel_name):
        super().__init__()
        self.kernel_name = kernel_name

    def __contains__(self, key):
        if dict.__contains__(self, key):
            return True
        _read_env_once()
        device = _device_name()
        pinned = _PINNED.get((device, self.kernel_name, key))
        if pinned is not None:
            dict.__setitem__(self, key, pinned)
            _USED[(device, self.kernel_name, key)] = pinned
            return True
        check_not_capturing(self.kernel_name, key)
        return False

    def __setitem__(self, key, config):
        dict.__setitem__(self, key, config)
        _USED[(_device_name(), self.kernel_name, key)] = config
        if _STATE["write_back"]:
            save(_STATE["write_back"])


def check_not_capturing(kernel_name, key):
    """Raises when a launch would autotune (key not tuned) while a CUDA graph is captured."""
    if _capturing():
        raise RuntimeError(
            f"svk kernel {kernel_name} has no tuned config for key {key} and the current CUDA "
            "stream is capturing a graph: autotuning would benchmark inside the capture and "
            "break it. Run svk.warmup(model, batch_sizes=..., seq_lens=...) (from svk.warmup) "
            "at the shapes you will capture, before capturing, or pin a tuning file "
            "(SVK_TUNING_FILE, svk.warmup.load_tuning) that holds this key.")


def needs_tuning(kernel, key):
    """Whether a launch of `kernel` (an Autotuner) at autotune key `key` would benchmark: it
    has several configs and neither this process nor the pinned file has tuned that key.
    Checks without tuning and without the capture check."""
    if len(kernel.configs) <= 1:
        return False
    cache = kernel.cache
    if dict.__contains__(cache, key):
        return False
    _read_env_once()
    name = getattr(cache, "kernel_name", kernel.base_fn.__name__)
    return (_device_name(), name, key) not in _PINNED


# Every autotuned svk kernel, by name (tests inspect their keys; warmup reports on them).
KERNELS = {}


def register(kernel):
    """Installs a TuningCache on an autotuned kernel; returns the kernel."""
    name = kernel.base_fn.__name__
    kernel.cache = TuningCache(name)
    KERNELS[name] = kernel
    return kernel


def _entries():
    return [{"device": device, "kernel": kernel, "key": list(key),
             "config": _config_to_json(config)}
            for (device, kernel, key), config in sorted(_USED.items(), key=repr)]


def load(path):
    """Pins every entry of a tuning file written by `save` (or by SVK_TUNING_FILE's write-back):
    later launches at those keys on a GPU of that name use its config, never measuring.
    Returns the number of entries read."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"svk tuning file {path} could not be read: {error}") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"svk tuning file {path} is not in format {FORMAT!r} (write it with "
                         "svk.warmup.save_tuning)")
    count = 0
    for entry in data.get("entries", []):
        try:
            key = tuple(entry["key"])
            config = _config_from_json(entry["config"])
            where = (entry["device"], entry["kernel"], key)
        except (KeyError, TypeError) as error:
            raise ValueError(f"svk tuning file {path}: malformed entry {entry!r}") from error
        _PINNED[where] = config
        # A key this process already tuned keeps what it runs; the pin applies to the rest
        # and to every later process.
        count += 1
    return count


def save(path):
    """Writes every config this process uses (tuned or pinned) to `path`, merged with the
    entries already there for other keys; atomic (a temporary file, then a rename)."""
    path = pathlib.Path(path)
    merged = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            for entry in old.get("entries", []):
                merged[(entry["device"], entry["kernel"], repr(entry["key"]))] = entry
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            merged = {}   # an unreadable file is replaced, not merged into
    for entry in _entries():
        merged[(entry["device"], entry["kernel"], repr(entry["key"]))] = entry
    data = {"format": FORMAT, "triton": triton.__version__, "torch": torch.__version__,
            "entries": [merged[k] for k in sorted(merged)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(data["entries"])


def tuned():
    """{(device, kernel, key): Config} of every config this process has used so far."""
    return dict(_USED)


def clear():
    """Forgets pinned and tuned configs (tests)."""
    _PINNED.clear()
    _USED.clear()
    for kernel in KERNELS.values():
        dict.clear(kernel.cache)
    _STATE.update(env_read=False, write_back=None)
