"""Optional native ops (csrc/): the adapter bank's gathered r×r product, CPU twin and CUDA.

Nothing here runs at `import svk`. The library is found, in order: a build made ahead of time
by setup.py (svk/_svk_native*.so, when a CUDA toolkit was present at install), a build already
in the cache directory, or a fresh build with ninja through torch.utils.cpp_extension.load
(`build()`, or the first call of backend="native"). Every failure is caught and recorded: svk
works without it, and `status()` says what is available and why not (`python -m svk.info`).

Cache: $SVK_NATIVE_CACHE, else ~/.cache/svk/native/<torch version>-<variant>-<source hash>, so
a new torch or edited sources build afresh and an unchanged one loads in milliseconds.
"""
from __future__ import annotations

import glob
import hashlib
import os
import threading
from pathlib import Path

import torch

PIECES = ("gather_core_cpu", "gather_core_cuda")
_HERE = Path(__file__).resolve().parent
_LOCK = threading.Lock()
_state = {"loaded": None, "error": None, "fake": False, "probed": False}


def _source_dir() -> Path | None:
    for candidate in (_HERE.parent / "csrc", _HERE / "csrc"):
        if (candidate / "gather_core_cpu.cpp").is_file():
            return candidate
    return None


def _cuda_wanted() -> tuple[bool, str]:
    """(compile the .cu?, why not)."""
    if torch.version.cuda is None:
        return False, f"this PyTorch ({torch.__version__}) is a CPU build"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None:
        return False, "no CUDA toolkit (nvcc) found: set CUDA_HOME"
    return True, ""


def _sources(source_dir: Path, with_cuda: bool) -> list[str]:
    names = ["gather_core_cpu.cpp"] + (["gather_core_cuda.cu"] if with_cuda else [])
    return [str(source_dir / name) for name in names]


def _build_dir(sources: list[str], with_cuda: bool) -> Path:
    digest = hashlib.sha256()
    for path in sources:
        digest.update(Path(path).read_bytes())
    tag = f"{torch.__version__.replace('+', '_')}-{'cuda' if with_cuda else 'cpu'}-" \
          f"{digest.hexdigest()[:12]}"
    root = os.environ.get("SVK_NATIVE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "svk", "native")
    return Path(root) / tag


def _register_fake():
    if _state["fake"]:
        return

    @torch.library.register_fake("svk_native::gather_core")
    def _(p, cores, ids, transpose):
        return p.new_empty(p.shape, dtype=torch.float32)

    _state["fake"] = True


def _load_library(path: str):
    torch.ops.load_library(path)
    _state["loaded"] = path
    _register_fake()


def _try_prebuilt() -> bool:
    """A build from setup.py or from the cache; never compiles."""
    if _state["loaded"]:
        return True
    if _state["probed"]:        # looked once already: no file I/O on every op call
        return False
    _state["probed"] = True
    candidates = sorted(glob.glob(str(_HERE / "_svk_native*.so")))
    source_dir = _source_dir()
    if source_dir is not None:
        with_cuda = _cuda_wanted()[0]
        build_dir = _build_dir(_sources(source_dir, with_cuda), with_cuda)
        candidates += sorted(glob.glob(str(build_dir / "svk_native*.so")))
    for path in candidates:
        try:
            _load_library(path)
            return True
        except Exception as error:  # a stale or foreign build: report it, try the next one
            _state["error"] = f"could not load {path}: {type(error).__name__}: {error}"
    return False


def build(verbose: bool = False) -> bool:
    """Loads the native library, compiling it with ninja on first use (tens of seconds).
    Returns whether it is available; the reason for a failure is in status()."""
    with _LOCK:
        if _try_prebuilt():
            return True
        source_dir = _source_dir()
        if source_dir is None:
            _state["error"] = ("csrc/ sources not found next to the package (a non-editable "
                               "install without package data)")
            return False
        if _state.get("build_failed"):
            return False            # one failed compile per process, not one per call
        from torch.utils import cpp_extension
        errors = []
        # Without CUDA the CPU twin still serves CPU tensors: a failing .cu (an nvcc/torch
        # CUDA mismatch) falls back to the C++ sources alone.
        for with_cuda in ([True, False] if _cuda_wanted()[0] else [False]):
            try:
                sources = _sources(source_dir, with_cuda)
                build_dir = _build_dir(sources, with_cuda)
                build_dir.mkdir(parents=True, exist_ok=True)
                path = cpp_extension.load(
                    name="svk_native", sources=sources, build_directory=str(build_dir),
                    extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], is_python_module=False,
                    verbose=verbose)
                _state["loaded"] = path if isinstance(path, str) else str(build_dir)
                _register_fake()
                _state["error"] = ("; ".join(errors) + " (built the CPU op only)") if errors \
                    else None
                return True
            except Exception as error:  # no compiler, no ninja, a toolkit mismatch: optional
                errors.append(f"build failed{' with CUDA' if with_cuda else ''}: "
                              f"{type(error).__name__}: {str(error)[-400:]}")
        _state["error"] = "; ".join(errors)
        _state["build_failed"] = True
        return False


def _has_kernel(dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(
            "svk_native::gather_core", dispatch_key)
    except Exception:
        return False


def loaded(device=None) -> bool:
    """Whether the op is loaded (never builds) for `device` (any device when None)."""
    if not _try_prebuilt():
        return False
    if device is None:
        return True
    return _has_kernel("CUDA" if torch.device(device).type == "cuda" else "CPU")


def ensure_built(device=None) -> bool:
    return (loaded(device) or build()) and loaded(device)


def status() -> dict[str, tuple[bool, str]]:
    """piece name → (available, reason). Loads an existing build; never compiles."""
    present = _try_prebuilt()
    why_not = _state["error"] or ("not built yet: `python -c 'import svk._native as n; "
                                  "n.build(verbose=True)'` compiles it (ninja, a C++ compiler)")
    result = {}
    for piece, key in (("gather_core_cpu", "CPU"), ("gather_core_cuda", "CUDA")):
        if present and _has_kernel(key):
            result[piece] = (True, f"loaded from {_state['loaded']}")
        elif key == "CUDA" and not _cuda_wanted()[0]:
            result[piece] = (False, _cuda_wanted()[1])
        elif present and key == "CUDA":
            result[piece] = (False, _state["error"] or (
                "the loaded build has no CUDA kernel (built without nvcc); "
                "delete the cache directory to rebuild"))
        else:
            result[piece] = (False, why_not)
    return result


def gather_core(p, cores, ids, transpose=False):
    """u_i = p_i·cores[id_i]ᵀ (transpose: p_i·cores[id_i]), fp32; ids outside [0, n) give 0."""
    if not ensure_built(p.device):
        raise RuntimeError(f"svk native gather_core is unavailable on {p.device}: {status()}")
    return torch.ops.svk_native.gather_core(p, cores, ids, transpose)
