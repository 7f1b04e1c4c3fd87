"""svk: singular-value kernels. Fused Triton kernels for SVD-based adapters.

Public API (DESIGN.md §2): the functional op ``sv_linear``; ``svk.reference`` holds the naive
oracle; ``svk.linalg`` the batched SVD used to initialise adapters.
"""
__version__ = "0.1.0"

from svk.ops import sv_linear  # noqa: E402

__all__ = ["sv_linear", "__version__"]
