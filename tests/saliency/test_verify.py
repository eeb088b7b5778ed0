"""Robustness verification: multi-restart PGD against a linear model's closed-form robustness, the
transfer attack, the gradient-masking verdicts, and FGSM with random start."""

import pytest
import torch
from torch import nn

from ift.saliency.pgd import fgsm_rs_attack
from ift.saliency.verify import accuracy_curve, correct, masking_checks, pgd_robust, square_robust


def binary_linear(seed=0, d=20):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 2)).eval()


def closed_form_robust(model, x, y, eps):
    """A 2-class linear model is robust at x (away from the pixel bounds) iff its margin exceeds
    eps * ||w_y - w_other||_1, the most an L-inf move of eps can remove."""
    w, b = model[1].weight.detach(), model[1].bias.detach()
    logits = x.flatten(1) @ w.T + b
    margin = logits.gather(1, y.view(-1, 1)).squeeze(1) - logits.gather(1, (1 - y).view(-1, 1)).squeeze(1)
    return margin > eps * (w[0] - w[1]).abs().sum()


def test_pgd_robust_matches_the_closed_form_on_a_linear_model():
    model = binary_linear()
    x = 0.4 + 0.2 * torch.rand(400, 1, 4, 5)  # eps 0.05 never reaches the [0, 1] bounds
    y = (torch.rand(400) < 0.5).long()
    eps = 0.05
    robust = pgd_robust(model, x, y, eps, step_size=0.01, steps=20, restarts=2, batch=64)
    expected = closed_form_robust(model, x, y, eps)
    assert 0 < expected.sum() < len(x)  # the test discriminates
    assert torch.equal(robust, expected)
    # crafted on the same model, the transfer attack is the white-box attack
    assert torch.equal(pgd_robust(model, x, y, eps, 0.01, 20, 1, source=model), expected)
    # robust implies correct at eps 0
    assert torch.equal(pgd_robust(model, x, y, 0.0, 0.01, 5, 1), correct(model, x, y))


def test_transfer_from_an_unrelated_model_is_weaker():
    model, other = binary_linear(0), binary_linear(1)
    x = 0.4 + 0.2 * torch.rand(300, 1, 4, 5)
    y = (torch.rand(300) < 0.5).long()
    white = pgd_robust(model, x, y, 0.05, 0.01, 20, 1)
    transfer = pgd_robust(model, x, y, 0.05, 0.01, 20, 1, source=other)
    assert (transfer | ~white).all() and transfer.sum() > white.sum()


def test_accuracy_curve_and_masking_verdicts():
    model = binary_linear()
    x = 0.4 + 0.2 * torch.rand(200, 1, 4, 5)
    y = (torch.rand(200) < 0.5).long()
    curve = accuracy_curve(lambda e: pgd_robust(model, x, y, e, max(e / 10, 1e-3), 30, 1), [0.0, 0.02, 0.05, 0.5])
    assert [r["eps"] for r in curve] == [0.0, 0.02, 0.05, 0.5]
    accs = [r["accuracy"] for r in curve]
    assert accs == sorted(accs, reverse=True) and accs[-1] == 0.0
    white = pgd_robust(model, x, y, 0.05, 0.01, 20, 1)
    ok = masking_checks(curve, white, {"transfer": white.clone()})
    assert ok["passed"] and ok["transfer_extra_broken"] == 0
    # a rising curve, an accuracy that never vanishes and a stronger black-box attack all fail
    bad_curve = [{"eps": 0.1, "accuracy": 0.5}, {"eps": 0.3, "accuracy": 0.7}, {"eps": 0.5, "accuracy": 0.4}]
    stronger = white.clone()
    stronger[white.nonzero()[:20, 0]] = False
    bad = masking_checks(bad_curve, white, {"square": stronger})
    assert not bad["monotone"] and not bad["vanishes"] and not bad["square_not_stronger"] and not bad["passed"]
    assert bad["square_extra_broken"] == 20


def test_square_attack_cannot_beat_the_closed_form():
    pytest.importorskip("torchattacks", reason="optional: pip install --no-deps torchattacks==3.5.1")
    model = binary_linear()
    x = 0.4 + 0.2 * torch.rand(100, 1, 4, 5)
    y = (torch.rand(100) < 0.5).long()
    robust = square_robust(model, x, y, 0.05, queries=200)
    assert (robust | ~closed_form_robust(model, x, y, 0.05)).all()  # no certified example is broken
    assert robust.sum() < correct(model, x, y).sum()  # and it breaks some


def test_fgsm_rs_stays_in_the_ball_and_pixel_range():
    model = binary_linear()
    x = torch.rand(50, 1, 4, 5)
    y = (torch.rand(50) < 0.5).long()
    adv = fgsm_rs_attack(model, x, y, eps=0.3, step_size=0.375, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 0.3 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with pytest.raises(ValueError, match="fgsm_rs_attack"):
        fgsm_rs_attack(model, x, y, eps=-1, step_size=0.1)
    with pytest.raises(ValueError, match="restarts"):
        pgd_robust(model, x, y, 0.1, 0.01, 1, 0)
