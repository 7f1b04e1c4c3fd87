"""Triton kernels and their launchers. Launchers check what the kernel relies on, allocate the
outputs and launch; they know nothing of autograd, modules or models."""
from svk.kernels.dropout import dropped_input
from svk.kernels.x_at import x_at
from svk.kernels.xw_plus_ub import xw_plus_ub, xw_plus_xasb

__all__ = ["dropped_input", "x_at", "xw_plus_ub", "xw_plus_xasb"]
