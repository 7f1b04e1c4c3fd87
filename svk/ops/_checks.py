"""Argument checks shared by the public ops: every error names the argument and what it saw.

They are the ops' per-call host cost, so each is a handful of attribute reads; a module that
calls an op repeatedly validates its own frozen tensors once (svk.nn.SVLinear) and checks only
the activation per call (`activation`).
"""
import math
import numbers

import torch

FLOAT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
# |scaling| beyond fp32's range would turn the adapter term into inf.
_MAX_SCALING = float(torch.finfo(torch.float32).max)


def tensor(name, value, *, optional=False):
    if value is None:
        if optional:
            return
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16, bf16, fp32 or fp64), "
                        f"got dtype {value.dtype}")


def shape(name, value, expected, meaning):
    if value is not None and value.shape != expected:
        raise ValueError(f"{name} must have shape {tuple(expected)} ({meaning}), "
                         f"got {tuple(value.shape)}")


def same_device(x, **tensors):
    device = x.device
    for name, value in tensors.items():
        if value is not None and value.device != device:
            raise ValueError(f"{name} is on {value.device} but x is on {device}; "
                             "all tensors of one call must be on the same device")


def scaling(value):
    """A finite real number (Python or NumPy), returned as a Python float."""
    if isinstance(value, float) and abs(value) <= _MAX_SCALING:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"scaling must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or abs(value) > _MAX_SCALING:
        raise ValueError(f"scaling must be finite and within fp32's range, got {value!r}")
    return value


def dropout(value):
    """A probability in [0, 1), returned as a Python float."""
    if isinstance(value, float) and 0.0 <= value < 1.0:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"dropout must be a real number, got {type(value).__name__}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {value!r}")
    return float(value)


def activation(x, weight):
    """x (..., in) against a weight already validated: floating, same dtype, same device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != weight.dtype:
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"x must be a floating tensor (fp16, bf16, fp32 or fp64), got "
                            f"dtype {x.dtype}")
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}; the base layer "
                        "runs in one dtype (adapter tensors may differ)")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        if x.dim() < 1:
            raise ValueError("x must have at least one dimension (..., in), got a scalar")
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weight "
                         f"{tuple(weight.shape)} expects in={weight.shape[1]}")
    if x.device != weight.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}; "
                         "all tensors of one call must be on the same device")


def base_layer(x, weight, bias):
    """x (..., in), weight (out, in) and bias (out,) in x's dtype."""
    tensor("weight", weight)
    tensor("bias", bias, optional=True)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    tensor("x", x)
    activation(x, weight)
    out_features, in_features = weight.shape
    if bias is not None:
        shape("bias", bias, (out_features,), "out")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but x has {x.dtype}; the base layer "
                            "runs in one dtype (adapter tensors may differ)")
    return out_features, in_features
