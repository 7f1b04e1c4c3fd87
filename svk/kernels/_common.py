"""What every launcher shares: interpreter detection, config lists, dtype plumbing."""
import collections
import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

from svk.kernels._limits import MAX_EPILOGUE_RANK, rank_pad  # noqa: F401  (re-exported)

def m_bucket(m: int) -> int:
    """Autotune key for the row count: powers of two, so a new batch size rarely retunes."""
    return min(triton.next_power_of_2(max(m, 1)), 1 << 16)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands go through tf32 only when PyTorch's own matmuls are allowed to."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRET:
        return "tf32"
    return "ieee"


def configs(gpu_configs, interpreter_config):
    """Autotuning on a GPU; one small fixed config under the interpreter, where every extra
    config would run the whole kernel again in Python."""
    if INTERPRET:
        return [triton.Config(interpreter_config, num_warps=4, num_stages=1)]
    return gpu_configs


def check_device(*tensors):
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda" and not INTERPRET:
            raise RuntimeError(
                "svk Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 (set before svk is "
                f"imported) to run on CPU; got a tensor on {t.device}")


# Launches per kernel name since import: lets tests prove which backend really ran.
LAUNCHES: "collections.Counter[str]" = collections.Counter()
