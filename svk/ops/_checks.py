"""Argument checks shared by the public ops: every error names the argument and what it saw."""
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    if value is not None and tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({meaning}), "
                         f"got {tuple(value.shape)}")


def same_device(x, **tensors):
    for name, value in tensors.items():
        if value is not None and value.device != x.device:
            raise ValueError(f"{name} is on {value.device} but x is on {x.device}; "
                             "all tensors of one call must be on the same device")


def scaling(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"scaling must be a Python float, got {type(value).__name__}")
    return float(value)


def base_layer(x, weight, bias):
    """x (..., in), weight (out, in) in x's dtype, bias (out,)."""
    tensor("x", x)
    tensor("weight", weight)
    tensor("bias", bias, optional=True)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in), got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weight "
                         f"{tuple(weight.shape)} expects in={in_features}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}; the base layer "
                        "runs in one dtype (adapter tensors may differ)")
    shape("bias", bias, (out_features,), "out")
    return out_features, in_features
