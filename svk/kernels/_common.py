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
    # None (no pruning) where torch does not report it (ROCm, older builds).
    return getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin",
                   None)


def adapter_copy_bytes(a):
    """A (BLOCK_R, BLOCK_K) adapter tile whose dtype differs from x's is also kept converted
    to x's dtype for tl.dot: one extra tile, not one per stage."""
    x, adapter = a["X"], a["A"]
    return 0 if adapter.dtype == x.dtype else a["BLOCK_R"] * a["BLOCK_K"] * x.element_size()


def prune_by_shared_memory(stage_bytes, extra_bytes=lambda a: 0):
    """An autotune early_config_prune dropping configs whose pipelined loads cannot fit.

    stage_bytes(args) is the bytes one K step loads into shared memory (the tiles of every
    operand, each in its own dtype); extra_bytes(args) what is allocated once besides (a
    converted adapter tile). The estimate is num_stages · stage_bytes + extra_bytes, an upper
    bound on every sm_90 compile compile_check has recorded: Triton keeps num_stages − 1
    steps for some operands and 32-row bf16 tiles but num_stages for tiles of ≥ 64 rows
    (wgmma) and for fp32. A config over the limit could never launch, and the autotuner
    would compile it only to find that out. The smallest config always survives."""
    def estimate(config, args, **kwargs):
        named = {**args, **kwargs, **config.kwargs}
        return config.num_stages * stage_bytes(named) + extra_bytes(named)

    def prune(configs_, args, **kwargs):
        limit = shared_memory_limit(args["X"].device)   # every pruned kernel has activations X
        if limit is None or len(configs_) == 1:
            return configs_
        need = {c: estimate(c, args, **kwargs) for c in configs_}
        kept = [c for c in configs_ if need[c] <= limit]
        return kept or [min(configs_, key=need.get)]
    prune.estimate = estimate        # compile_check compares it with what the compiler used
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
