"""What every launcher shares: interpreter detection, config lists, dtype plumbing."""
import collections
import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

from svk.kernels._limits import MAX_EPILOGUE_RANK, rank_pad  # noqa: F401  (re-exported)

# The r-sized epilogue products (t·coreᵀ, the router's g·lambdas) have fp32 operands. "ieee"
# makes them FMA loops whose operand layouts cost registers: sm_90 compiles spilled 88–832
# B/thread at r = 64 (compile_check). "tf32x3" runs them on tensor cores at about fp32
# accuracy (three TF32 products of split operands). The interpreter computes in fp32 anyway.
EPILOGUE_PRECISION = "ieee" if INTERPRET else "tf32x3"


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


# Set by compile_check (no device to ask); None: ask the current CUDA device.
SHARED_MEMORY_LIMIT = None


def shared_memory_limit(device):
    """Bytes of shared memory one program may opt into on `device` (227 KiB on an H100)."""
    if SHARED_MEMORY_LIMIT is not None or device.type != "cuda":
        return SHARED_MEMORY_LIMIT
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def prune_by_shared_memory(stage_bytes):
    """An autotune early_config_prune dropping configs whose pipelined loads cannot fit.

    stage_bytes(config, args) is the bytes one K step loads into shared memory (the tiles of
    every operand, each in its own dtype). sm_90 compiles of these kernels (compile_check)
    allocate num_stages − 1 such steps for fp16/bf16 activations and num_stages for fp32
    ones (TF32 or IEEE products), to the byte in the cases checked; a config over the limit
    could never launch, and the autotuner would compile it only to find that out. The
    smallest config always survives."""
    def prune(configs_, args, **kwargs):
        tensor = args["X"]                  # the activations: every pruned kernel has one
        limit = shared_memory_limit(tensor.device)
        if limit is None or len(configs_) == 1:
            return configs_
        named = {**args, **kwargs}
        lag = 0 if tensor.element_size() >= 4 else 1
        need = {c: max(c.num_stages - lag, 1) * stage_bytes({**named, **c.kwargs})
                for c in configs_}
        kept = [c for c in configs_ if need[c] <= limit]
        return kept or [min(configs_, key=need.get)]
    return prune


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
