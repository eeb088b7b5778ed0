"""PGD stays in the eps-ball and the pixel range and raises the loss; probes against closed forms."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ift.saliency import (build_network, input_gradient_norm, input_hessian_norm, max_sensitivity, pgd_attack,
                          softplus_gradient_lipschitz)


def test_pgd_increases_loss_and_respects_constraints():
    torch.manual_seed(0)
    model = build_network("small_cnn", (1, 8, 8), 10).eval()
    x = torch.rand(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    eps = 0.1
    x_adv = pgd_attack(model, x, y, eps=eps, step_size=0.025, steps=10, generator=torch.Generator().manual_seed(1))
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
    assert all(p.grad is None for p in model.parameters())


def test_pgd_on_linear_model_reaches_the_corner():
    """For a linear 2-class model the worst case in the ball is x + eps * sign(w_other - w_true)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = torch.full((1, 1, 2, 2), 0.5)
    y = torch.tensor([0])
    x_adv = pgd_attack(model, x, y, eps=0.2, step_size=0.05, steps=10, random_start=False)
    w = model[1].weight.detach()
    assert torch.allclose(x_adv.flatten(), (x.flatten() + 0.2 * torch.sign(w[1] - w[0])), atol=1e-6)


def test_pgd_rejects_negative_eps():
    with pytest.raises(ValueError, match="eps"):
        pgd_attack(nn.Linear(2, 2), torch.rand(1, 2), torch.tensor([0]), eps=-1, step_size=0.1, steps=1)


def test_gradient_and_hessian_norm_of_quadratic():
    """s(x) = x^T A x / 2 with symmetric A: grad = A x, Hessian = A."""
    torch.manual_seed(0)
    m = torch.randn(9, 9, dtype=torch.float64)
    a = (m + m.T) / 2
    score = lambda x: 0.5 * torch.einsum("bi,ij,bj->b", x.flatten(1), a, x.flatten(1))
    x = torch.randn(3, 1, 3, 3, dtype=torch.float64)
    assert torch.allclose(input_gradient_norm(score, x), (x.flatten(1) @ a).norm(dim=1))
    hess = input_hessian_norm(score, x, iters=500, tol=1e-12, generator=torch.Generator().manual_seed(0))
    spectral = torch.linalg.eigvalsh(a).abs().max()
    assert torch.allclose(hess, spectral.expand(3), rtol=1e-4)


def test_hessian_norm_of_indefinite_hessian_with_opposite_eigenvalues():
    """Eigenvalues +2 and -2: a plain Rayleigh quotient of H would report about 0."""
    a = torch.diag(torch.tensor([2.0, -2.0, 0.5, 0.1], dtype=torch.float64))
    score = lambda x: 0.5 * torch.einsum("bi,ij,bj->b", x.flatten(1), a, x.flatten(1))
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    v0_gen = torch.Generator().manual_seed(1)
    hess = input_hessian_norm(score, x, iters=200, tol=1e-12, generator=v0_gen)
    assert torch.allclose(hess, torch.full((2,), 2.0, dtype=torch.float64), rtol=1e-6)


def test_softplus_lipschitz_bound_holds_and_matches_one_layer_formula():
    torch.manual_seed(0)
    net = build_network("softplus_mlp", (1, 3, 3), 2, hidden=(6,)).double()
    w1, w2 = (w.detach() for w in net.weights())
    bound = softplus_gradient_lipschitz([w1, w2])
    expected = float(torch.linalg.matrix_norm(w2, 2) * torch.linalg.matrix_norm(w1, 2) ** 2 / 4)
    assert math.isclose(bound, expected, rel_tol=1e-12)
    assert softplus_gradient_lipschitz([w1, w2], "fro") >= bound
    deep = build_network("softplus_mlp", (1, 3, 3), 2, hidden=(8, 8)).double()
    x = torch.rand(5, 1, 3, 3, dtype=torch.float64)
    target = torch.zeros(5, dtype=torch.long)

    def grad(z, t):
        z = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(deep(z).gather(1, t.view(-1, 1)).sum(), z)
        return g

    r = 0.5
    sens = max_sensitivity(grad, x, radius=r, n_samples=200, target=target, normalize="none")
    assert (sens <= softplus_gradient_lipschitz(deep.weights()) * r * math.sqrt(9)).all()
    assert (sens > 0).all()
