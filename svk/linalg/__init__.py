"""svk.linalg: batched SVDs for initialising SVD-based adapters (DESIGN.md §5).

    U, S, Vh = rsvd(W, rank)               top-r triplets, randomized block Krylov, fp32
    S = singular_values(W)                 full spectrum, from the float64 Gram matrix
    U, S, Vh = bottom_svd(W, k)            bottom-k triplets (SiVA, KaSA)
    k = threshold(S, tau)                  SARA's rank rule
    k = tail(S, perc, criterion="sum")     SiVA's rank rule
    out = batched_svd(weights, mode=...)   many weights of mixed shapes, grouped and batched

W may be (m, n) or a stack (..., m, n) of any floating dtype on CPU or CUDA; results are
float32. Only torch and tqdm are imported.
"""
from ._checks import SVDResult
from .batched import batched_svd
from .rank_rules import tail, threshold
from .rsvd import default_n_iter, default_oversample, rsvd
from .spectrum import bottom_svd, singular_values

__all__ = ["SVDResult", "batched_svd", "bottom_svd", "default_n_iter", "default_oversample",
           "rsvd", "singular_values", "tail", "threshold"]
