"""Public ops: argument checks, backend dispatch, torch.library registration, autograd."""
from svk.ops.sv_bank_linear import sv_bank_linear
from svk.ops.sv_linear import sv_linear
from svk.ops.sv_mixture_linear import sv_mixture_linear

__all__ = ["sv_linear", "sv_mixture_linear", "sv_bank_linear"]
