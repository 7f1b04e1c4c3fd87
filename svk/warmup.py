"""svk.warmup: run a model once at every shape it will see, so every kernel has tuned before a
CUDA graph is captured (or before a latency-sensitive service takes traffic).

Triton autotunes a kernel the first time it sees a new key (row bucket, sizes, dtypes, flags):
it benchmarks every config, synchronising the device. Inside `torch.cuda.graph(...)` that
breaks the capture, so svk refuses it there (a RuntimeError naming this function). Warm up
first, at the batch sizes and sequence lengths you will capture:

    import svk.warmup
    svk.warmup(model, batch_sizes=[1, 2, 4, 8], seq_lens=[1], backward=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(static_input)

Rows are bucketed to powers of two in the keys, so warming up M = batch·seq_len covers every
M of the same bucket (M ∈ (512, 1024] share one key).

Reproducible configs across processes and DDP ranks: `save_tuning(path)` after warming up
(or `warmup(..., save=path)`) writes every config in use; `load_tuning(path)` (or
SVK_TUNING_FILE=path in the environment, read at the first launch) pins them: a (kernel, key)
in the file is never measured again on a GPU of the same name. With SVK_TUNING_FILE set, new
results are also written back to the file, so it serves as an on-disk cache.

On CPU (PyTorch backend, or Triton's interpreter) nothing is tuned; warmup simply runs the
model at each shape.
"""
import sys
import types

import torch

from svk.kernels import _tuning

__all__ = ["warmup", "save_tuning", "load_tuning", "tuned_configs"]


def save_tuning(path):
    """Writes every tuned config this process uses to `path` (JSON), merged with the file's
    entries for other keys; returns the number of entries."""
    return _tuning.save(path)


def load_tuning(path):
    """Pins the configs of a file written by save_tuning; returns how many entries it holds."""
    return _tuning.load(path)


def tuned_configs():
    """{(device name, kernel name, key): triton.Config} of every config in use so far."""
    return _tuning.tuned()


def _first_tensor(out):
    """The tensor to backpropagate from: the output itself, a model output's logits /
    last_hidden_state, or the first tensor of a tuple/list/dict."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("loss", "logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    values = out.values() if isinstance(out, dict) else out if isinstance(
        out, (tuple, list)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def _default_inputs(model, batch_size, seq_len):
    """Arguments for one call of a module: token ids for a model with a vocabulary (a
    Hugging Face model), else activations of its first weight's input width."""
    params = list(model.parameters())
    if not params:
        raise ValueError("svk.warmup: the model has no parameters to infer an input from; "
                         "pass make_inputs=lambda batch_size, seq_len: (args, kwargs)")
    device = params[0].device
    lead = (batch_size,) if seq_len is None else (batch_size, seq_len)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab:
        return (torch.randint(0, vocab, lead if seq_len is not None else (batch_size, 1),
                              device=device),), {}
    weights = [p for p in params if p.dim() == 2 and p.is_floating_point()]
    if not weights:
        raise ValueError("svk.warmup: cannot infer the input width of the model; pass "
                         "make_inputs=lambda batch_size, seq_len: (args, kwargs)")
    weight = weights[0]
    return (torch.randn(lead + (weight.shape[1],), device=device, dtype=weight.dtype),), {}


def warmup(model_or_callable, batch_sizes=(1,), seq_lens=(None,), *, backward=False,
           make_inputs=None, save=None):
    """Runs the model at every (batch_size, seq_len) so each svk kernel it launches tunes now.

    model_or_callable: an nn.Module, or any callable taking (batch_size, seq_len) and running
    one step itself. batch_sizes, seq_lens: the shapes to warm up (seq_len None: 2-D inputs
    (batch, features), or (batch, 1) token ids). make_inputs(batch_size, seq_len) -> (args,
    kwargs) builds a module's inputs (default: token ids when the module has
    config.vocab_size, else random activations as wide as its first 2-D weight). backward:
    also run a backward from the output (tunes the backward kernels); parameter gradients
    are restored afterwards, so warming up does not change a training run's state.
    save: a path to write the tuned configs to (save_tuning).

    The random number generators are forked, and a module's train/eval mode is left as it
    is. Without backward the forward runs under torch.no_grad (inference, what a decode
    graph captures); a training step warms up with backward=True. Returns
    {(device name, kernel name, key): config} of the configs now in use.
    """
    if not callable(model_or_callable):
        raise TypeError(f"svk.warmup needs an nn.Module or a callable, got "
                        f"{type(model_or_callable).__name__}")
    for name, values in (("batch_sizes", batch_sizes), ("seq_lens", seq_lens)):
        for value in values:
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"svk.warmup: {name} must hold positive ints, got {value!r}")
    if _tuning._capturing():
        raise RuntimeError("svk.warmup cannot run inside a CUDA-graph capture: it exists to "
                           "tune before capturing")
    module = model_or_callable if isinstance(model_or_callable, torch.nn.Module) else None
    params = list(module.parameters()) if module is not None else []
    saved_grads = [p.grad for p in params]
    for p in params:
        p.grad = None    # backward accumulates into .grad in place: keep the old ones apart
    devices = sorted({p.device.index for p in params if p.device.type == "cuda"})
    if not devices and torch.cuda.is_available():
        devices = [torch.cuda.current_device()]
    try:
        with torch.random.fork_rng(devices=devices):
            for batch_size in batch_sizes:
                for seq_len in seq_lens:
                    _step(model_or_callable, module, batch_size, seq_len, backward,
                          make_inputs)
    finally:
        for p, grad in zip(params, saved_grads):
            p.grad = grad
    if torch.cuda.is_available() and devices:
        for index in devices:
            torch.cuda.synchronize(index)
    if save is not None:
        save_tuning(save)
    return tuned_configs()


def _step(fn, module, batch_size, seq_len, backward, make_inputs):
    if module is None:
        with torch.set_grad_enabled(backward):
            fn(batch_size, seq_len)
        return
    if make_inputs is not None:
        args, kwargs = make_inputs(batch_size, seq_len)
    else:
        args, kwargs = _default_inputs(module, batch_size, seq_len)
    if not backward:
        with torch.no_grad():
            module(*args, **kwargs)
        return
    out = _first_tensor(module(*args, **kwargs))
    if out is None or not out.requires_grad:
        raise ValueError("svk.warmup(backward=True): the model's output has no tensor that "
                         "requires grad (are its adapters frozen?)")
    # Gradients land in .grad and are put back by warmup; inputs get none.
    out.float().sum().backward()


class _CallableModule(types.ModuleType):
    """`svk.warmup(model, ...)` calls warmup while svk.warmup.save_tuning etc. stay reachable."""

    def __call__(self, *args, **kwargs):
        return warmup(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
