"""What every launcher shares: interpreter detection, config lists, dtype plumbing."""
import collections
import contextlib
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


# SVK_AUTOTUNE=0 (read at import): every launch runs one config (the smallest the pruning
# keeps) instead of benchmarking them all. For test runs on a GPU, where tuning each key of
# each test (hundreds of compiles) would outrun the time limit; never for speed. Triton 3.9
# then skips the benchmark; 3.6 still times the one config once per key (no other compile).
AUTOTUNE = os.environ.get("SVK_AUTOTUNE", "1") != "0"


def first_if_untuned(configs_, args=None, **kwargs):
    """An early_config_prune for kernels with nothing to prune: all configs, or under
    SVK_AUTOTUNE=0 the first alone."""
    return configs_ if AUTOTUNE else configs_[:1]


def m_bucket(m: int) -> int:
    """Autotune key for the row count: powers of two, so a new batch size rarely retunes."""
    return min(triton.next_power_of_2(max(m, 1)), 1 << 16)


_MATMUL = torch.backends.cuda.matmul


def _tf32_allowed() -> bool:
    """Whether PyTorch's own fp32 matmuls may use TF32. torch ≥ 2.9 has the fp32_precision
    API ("tf32", "ieee", or "none" = inherit); reading the legacy allow_tf32 once the new API
    has been set raises there (transformers sets it), so the new one is read where it exists."""
    precision = getattr(_MATMUL, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(_MATMUL.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands go through tf32 only when PyTorch's own matmuls are allowed to. 16-bit
    activations (the common case) return at once: no flag is read on their launches."""
    if dtype != torch.float32 or INTERPRET:
        return "ieee"
    return "tf32" if _tf32_allowed() else "ieee"


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


def core_epilogue_bytes(a):
    """The r-sized epilogue u·coreᵀ (fp32, tf32x3) stages both fp32 operands in shared memory:
    (BLOCK_M + BLOCK_R)·BLOCK_R·4 bytes. sm_90, x_at at BLOCK_M = BLOCK_R = 128 with a bf16
    a: the loop needs 96 KiB, the compiler allocated exactly this, 128 KiB (compile_check)."""
    if not a.get("HAS_CORE", False):
        return 0
    return (a["BLOCK_M"] + a["BLOCK_R"]) * a["BLOCK_R"] * 4


def adapter_copy_bytes(a):
    """A (BLOCK_R, BLOCK_K) adapter tile whose dtype differs from x's is also kept converted
    to x's dtype for tl.dot: one extra tile, not one per stage."""
    x, adapter = a["X"], a["A"]
    return 0 if adapter.dtype == x.dtype else a["BLOCK_R"] * a["BLOCK_K"] * x.element_size()


def prune_by_shared_memory(stage_bytes, extra_bytes=lambda a: 0, epilogue_bytes=lambda a: 0):
    """An autotune early_config_prune dropping configs whose pipelined loads cannot fit.

    stage_bytes(args) is the bytes one K step loads into shared memory (the tiles of every
    operand, each in its own dtype); extra_bytes(args) what is allocated once besides (a
    converted adapter tile). The estimate is num_stages · stage_bytes + extra_bytes, an upper
    bound on every sm_90 compile compile_check has recorded: Triton keeps num_stages − 1
    steps for some operands and 32-row bf16 tiles but num_stages for tiles of ≥ 64 rows
    (wgmma) and for fp32. epilogue_bytes(args) is what the code after the K loop stages
    (its buffers reuse the loop's, so the estimate is the larger of the two). A config over
    the limit could never launch, and the autotuner would compile it only to find that out.
    The smallest config always survives."""
    def estimate(config, args, **kwargs):
        named = {**args, **kwargs, **config.kwargs}
        return max(config.num_stages * stage_bytes(named) + extra_bytes(named),
                   epilogue_bytes(named))

    def prune(configs_, args, **kwargs):
        limit = shared_memory_limit(args["X"].device)   # every pruned kernel has activations X
        if len(configs_) == 1 or (limit is None and AUTOTUNE):
            return configs_
        need = {c: estimate(c, args, **kwargs) for c in configs_}
        kept = configs_ if limit is None else [c for c in configs_ if need[c] <= limit]
        kept = kept or [min(configs_, key=need.get)]
        # SVK_AUTOTUNE=0: the config needing the least shared memory, alone (no benchmark).
        return kept if AUTOTUNE else [min(kept, key=need.get)]
    prune.estimate = estimate        # compile_check compares it with what the compiler used
    return prune


_NO_GUARD = contextlib.nullcontext()


def check_device(x, **others):
    """The context a launch on x's tensors runs in: every named tensor (None skipped) must be
    on x's device (ValueError naming it), and a CUDA x on another GPU than the current one
    switches to it for the launch (Triton launches on the current device and stream; with
    device_map="auto" a layer's tensors live on any GPU). The switch costs a context only
    when the device differs, so a single-GPU step pays one device comparison per tensor."""
    device = x.device
    for name, t in others.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the activations are on {device}; "
                             "every tensor of one svk kernel launch must be on the same device")
    if device.type != "cuda":
        if not INTERPRET:
            raise RuntimeError(
                "svk Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 (set before svk is "
                f"imported) to run on CPU; got a tensor on {device}")
        return _NO_GUARD
    if device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device.index)
    return _NO_GUARD


def as_operand(adapter, x):
    """An adapter factor in the activations' dtype for tl.dot, converted once here rather than
    tile by tile inside the K loop (there the conversion made every iteration wait for the
    previous wgmma, TTGIR `pendings = 0`). torch's conversion rounds to nearest-even exactly
    as the kernel's .to() did, so results are unchanged; a no-op when the dtypes match."""
    return adapter if adapter.dtype == x.dtype else adapter.to(x.dtype)


# Launches per kernel name since import: lets tests prove which backend really ran.
LAUNCHES: "collections.Counter[str]" = collections.Counter()
