"""Shared helpers for the op tests: float64 oracle comparison with per-dtype tolerances."""
import torch

# Tests run on the GPU when there is one (compiled kernels), else on CPU (interpreter).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Relative Frobenius error an op may show against the float64 oracle, at least. Each is a few
# units of the dtype's rounding (fp32 ε = 1.2e-7, fp16 ε = 9.8e-4, bf16 ε = 7.8e-3) times the
# √K growth of a K-long fp32-accumulated dot product at the test sizes (K ≤ 128):
# the output is rounded once to the dtype, the adapter term once more.
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def rel_err(value, oracle):
    value, oracle = value.double(), oracle.double()
    return ((value - oracle).norm() / oracle.norm().clamp_min(1e-30)).item()


def assert_close_to_oracle(value, oracle, same_dtype_value, dtype, name):
    """flash-attention's rule: the kernel may be at most twice as far from the float64 oracle as
    PyTorch computing the same thing in the same dtype, or within the dtype's floor."""
    err = rel_err(value, oracle)
    bound = max(2 * rel_err(same_dtype_value, oracle), FLOOR[dtype])
    assert err <= bound, f"{name}: relative error {err:.3g} > bound {bound:.3g} ({dtype})"


def grads(y, inputs, weight):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    result = torch.autograd.grad((y.double() * weight).sum(), wanted)
    return dict(zip([id(t) for t in wanted], result))


def set_env(monkeypatch, name, value):
    """monkeypatch.setenv (or delenv for None), then make svk read its settings again."""
    from svk.ops import _dispatch
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    _dispatch.reload_settings()
