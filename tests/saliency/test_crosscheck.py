"""Quantus 0.6 (optional) against our SENS_max and INFD under matched settings."""

import pytest
import torch
from torch import nn

from ift.saliency import gradient, max_sensitivity, to_global

pytest.importorskip("quantus", reason="optional cross-check: pip install quantus==0.6.0")

from ift.saliency.crosscheck import quantus_infidelity, quantus_max_sensitivity  # noqa: E402


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()


def test_quantus_infidelity_equals_ours_on_its_perturbations():
    net = small_cnn()
    x, y = torch.rand(12, 1, 8, 8), torch.randint(0, 3, (12,))
    q, ours, settings = quantus_infidelity(net, gradient(net)(x, y), x, y, patch=4)
    assert settings["perturbations"] == 4 and q.shape == (12,)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(q), rtol=1e-4, atol=1e-7)


def test_quantus_max_sensitivity_agrees_within_three_standard_errors():
    net = small_cnn()
    x, y = torch.rand(30, 1, 8, 8), torch.randint(0, 3, (30,))
    expl = to_global(gradient(net))
    q, settings = quantus_max_sensitivity(net, expl, x, y, radius=0.1, samples=30)
    ours = max_sensitivity(expl, x, 0.1, 30, y, generator=torch.Generator().manual_seed(0)).numpy()
    diff = ours - q
    se = diff.std(ddof=1) / len(diff) ** 0.5
    assert abs(diff.mean()) <= 3 * se and settings["radius"] == 0.1
