"""svk.merge reports how much of the update a 16-bit weight lost (issue 16 item 7)."""
import warnings

import pytest
import torch

import svk


def _model(dtype, core_std):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48)).to(dtype)
    svk.inject(model, svk.AdapterConfig(method="lora_xs", rank=8, target_modules=["0"]))
    with torch.no_grad():
        model[0].core.normal_(0.0, core_std)
    return model


def test_bf16_merge_reports_and_warns_about_the_lost_update():
    # |ΔW|/|W| ≈ 3e-4: most entries sit below half a bf16 ulp of W.
    model = _model(torch.bfloat16, 1e-4)
    original = model[0].weight.detach().clone()
    delta = model[0].delta_weight()
    with pytest.warns(UserWarning, match="lost"):
        errors = svk.merge(model)
    applied = model[0].weight.float() - original.float()
    expected = float((applied - delta).norm() / delta.norm())
    assert errors == {"0": pytest.approx(expected)} and expected > 0.5
    assert model[0].merge_error == errors["0"]
    svk.unmerge(model)
    assert torch.equal(model[0].weight, original)        # unmerge stays exact


def test_fp32_merge_is_quiet_and_nearly_exact():
    model = _model(torch.float32, 1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        errors = svk.merge(model)
    assert errors["0"] < 1e-5
