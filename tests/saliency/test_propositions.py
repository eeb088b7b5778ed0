"""Propositions 2.1-2.4 of Yeh et al. 2019 as checks of the optimal-explanation solver.

The optimal explanation for a perturbation law is ``Phi* = (E[I I^T])^-1 E[I (f(x) - f(x - I))]``
(``ift.saliency.explanations.solve_normal_equations`` through ``optimal_noisy_baseline``,
``optimal_square`` and ``theory.optimal_explanation``). Known answers:
- 2.1: ``E[I (f(x) - f(x - I))] = E[I I^T IG(x, I)]``, IG the path-averaged gradient from x - I to x;
  for a quadratic f and the noisy-baseline law the population ``Phi*`` has a closed form.
- 2.2: ``I = eps e_i`` gives the gradient as eps -> 0 (error eps/2 * Hess_ii + O(eps^2)).
- 2.3: ``I = e_i * x`` gives occlusion-1 (x * Phi = f(x) - f(x with x_i = 0)).
- 2.4: ``I = x * Z`` with the SHAP kernel weighting gives the Shapley values.
Everything runs in float64.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from captum.attr import KernelShap, Occlusion
from torch import nn

from ift.saliency import gradient, optimal_noisy_baseline, optimal_square
from ift.saliency.measures import noisy_baseline_perturbations
from ift.saliency.theory import optimal_explanation, shap_kernel_weight

SHAPE = (1, 3, 3)  # d = 9 features: small enough to enumerate all 2^9 coalitions
D = 9


def softplus_net(seed=0, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(D, 16), nn.Softplus(), nn.Linear(16, 16), nn.Softplus(),
                         nn.Linear(16, classes)).double().eval()


def inputs(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 0.1 + 0.9 * torch.rand(b, *SHAPE, generator=g, dtype=torch.float64)


def score(model, t):
    return lambda z: model(z)[:, t]


class Quadratic(nn.Module):
    """``f(x) = x^T Q x / 2 + b^T x`` as a one-logit model."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(D, D, generator=g, dtype=torch.float64)
        self.q = (a + a.T) / 2
        self.b = torch.randn(D, generator=g, dtype=torch.float64)

    def forward(self, x):
        z = x.flatten(1)
        return (0.5 * ((z @ self.q) * z).sum(1) + z @ self.b).unsqueeze(1)


def clipped_gaussian_moments(sigma):
    """E[x0^k], k = 1..3, for x0 = clip(sigma * eps, 0, 1), eps ~ N(0, 1), by fine quadrature."""
    e = np.linspace(0, 1 / sigma, 200001)
    dens = np.exp(-e ** 2 / 2) / math.sqrt(2 * math.pi)
    tail = 0.5 * math.erfc(1 / sigma / math.sqrt(2))  # P(x0 = 1)
    return [np.trapezoid((sigma * e) ** k * dens, e) + tail for k in (1, 2, 3)]


def noisy_baseline_optimum(model, x, sigma):
    """Population Phi* for the quadratic model (Prop. 2.1 with IG(x, I) = grad f(x) - Q I / 2):
    ``Phi* = g - Sigma2^-1 E[I (I^T Q I)] / 2`` with I = mu + Z, Z independent, var v, third
    central moment k3: ``E[I (I^T Q I)] = mu (mu^T Q mu + tr(Q diag v)) + 2 diag(v) Q mu + diag(Q) k3``."""
    m1, m2, m3 = clipped_gaussian_moments(sigma)
    v, k3 = m2 - m1 ** 2, -(m3 - 3 * m1 * m2 + 2 * m1 ** 3)  # I = x - x0 flips the third moment's sign
    q, out = model.q, []
    for xb in x.flatten(1):
        mu = xb - m1
        sigma2 = v * torch.eye(D, dtype=torch.float64) + torch.outer(mu, mu)
        third = mu * (mu @ q @ mu + v * q.trace()) + 2 * v * (q @ mu) + q.diagonal() * k3
        g = q @ xb + model.b
        out.append(g - torch.linalg.solve(sigma2, third) / 2)
    return torch.stack(out).view_as(x)


def test_prop_2_1_noisy_baseline_solver_matches_population_optimum_within_mc_error():
    """Error model: the least-squares estimate from n i.i.d. draws is asymptotically normal,
    ``Phi_hat - Phi* ~ N(0, S^-1 E[r^2 I I^T] S^-1 / n)`` with ``S = E[I I^T]`` and the residual
    ``r = I^T Phi* - (f(x) - f(x - I))`` (sandwich covariance, estimated on independent draws).
    Every coordinate must lie within 5 standard errors (P(fail) < 1e-5 for 18 coordinates)."""
    model, x, sigma, n = Quadratic(), inputs(), 0.2, 20000
    target = torch.zeros(2, dtype=torch.long)
    phi_hat = optimal_noisy_baseline(model, n, sigma, generator=torch.Generator().manual_seed(2))(x, target)
    phi_star = noisy_baseline_optimum(model, x, sigma)
    pert = noisy_baseline_perturbations(x, 50000, sigma, generator=torch.Generator().manual_seed(3))
    a = pert.flatten(2)
    df = model(x)[:, 0] - model((x.unsqueeze(0) - pert).flatten(0, 1))[:, 0].view(50000, 2)
    r = (a * phi_star.flatten(1)).sum(-1) - df
    for b in range(2):
        s = a[:, b].T @ a[:, b] / len(a)
        meat = (a[:, b] * r[:, b, None] ** 2).T @ a[:, b] / len(a)
        s_inv = torch.linalg.inv(s)
        se = ((s_inv @ meat @ s_inv).diagonal() / n).sqrt()
        z = (phi_hat[b].flatten() - phi_star[b].flatten()) / se
        assert z.abs().max() < 5, z
        assert se.max() < 0.05 * phi_star[b].norm()  # the check has teeth: errors are small against Phi*


def test_prop_2_1_solution_is_the_ig_closed_form_on_the_same_samples():
    """On any fixed samples, ``I^T IG(x, I) = f(x) - f(x - I)`` exactly, so the solver's answer is
    ``(sum I I^T)^-1 sum I I^T IG(x, I)``; IG by 16-node Gauss-Legendre (error ~ 1e-12 here)."""
    model, x = softplus_net(), inputs()
    f = score(model, 1)
    pert = noisy_baseline_perturbations(x, 400, 0.2, generator=torch.Generator().manual_seed(4))
    phi = optimal_explanation(f, x, pert)
    nodes, weights = np.polynomial.legendre.leggauss(16)
    ig = torch.zeros_like(pert)
    for t, w in zip((nodes + 1) / 2, weights / 2):
        pts = (x.unsqueeze(0) - (1 - t) * pert).flatten(0, 1).requires_grad_(True)
        (g,) = torch.autograd.grad(f(pts).sum(), pts)
        ig += w * g.view_as(pert)
    a = pert.flatten(2)
    gram = torch.einsum("kbi,kbj->bij", a, a)
    rhs = torch.einsum("kbi,kbj,kbj->bi", a, a, ig.flatten(2))
    closed = torch.linalg.solve(gram, rhs.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(phi.flatten(1), closed, rtol=1e-8, atol=1e-10)
    # and the noisy-baseline explanation is not simply the gradient at x (the check is not vacuous)
    grad = gradient(model)(x, 1)
    assert (phi - grad).norm() > 0.05 * grad.norm()


def test_prop_2_2_small_eps_perturbations_give_the_gradient():
    """Backward differences: ``Phi_i = (f(x) - f(x - eps e_i)) / eps = g_i - eps/2 H_ii + O(eps^2)``."""
    model, x = softplus_net(), inputs()
    f = score(model, 2)
    grad = gradient(model)(x, 2)
    xr = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(xr).sum(), xr, create_graph=True)
    hess_diag = torch.stack([torch.autograd.grad(g.flatten(1)[:, i].sum(), xr, retain_graph=True)[0].flatten(1)[:, i]
                             for i in range(D)], 1).view_as(x)
    errors = []
    for eps in (1e-2, 1e-3, 1e-4):
        pert = eps * torch.eye(D, dtype=torch.float64).view(D, 1, *SHAPE).expand(D, 2, *SHAPE)
        phi = optimal_explanation(f, x, pert)
        assert (phi - (grad - eps / 2 * hess_diag)).abs().max() < 10 * eps ** 2
        errors.append((phi - grad).abs().max())
    assert errors[0] / errors[1] == pytest.approx(10, rel=0.05) and errors[1] / errors[2] == pytest.approx(10, rel=0.05)


@torch.no_grad()
def occlusion_1(model, x, t):
    """``f(x) - f(x with x_i = 0)`` for every pixel i, directly."""
    rows = torch.arange(len(x))
    drop = [model(x * (1 - torch.eye(D, dtype=x.dtype)[i].view(1, *SHAPE)))[rows, t] for i in range(D)]
    return (model(x)[rows, t].unsqueeze(1) - torch.stack(drop, 1)).view_as(x)


def test_prop_2_3_single_feature_removal_gives_occlusion_1():
    model, x = softplus_net(), inputs()
    t = torch.tensor([0, 2])
    occ = occlusion_1(model, x, t)
    # captum's Occlusion agrees (it accumulates in float32)
    cap = Occlusion(model).attribute(x, sliding_window_shapes=(1, 1, 1), baselines=0.0, target=t)
    torch.testing.assert_close(cap.double(), occ, rtol=1e-5, atol=1e-7)
    # the project's square solver restricted to 1x1 squares (a global attribution x * Phi)
    torch.testing.assert_close(optimal_square(model, square_sizes=(1, 1))(x, t), occ, rtol=1e-9, atol=1e-12)
    # and the generic solver with I = e_i * x, read as x * Phi
    pert = torch.eye(D, dtype=torch.float64).view(D, 1, *SHAPE) * x.unsqueeze(0)
    phi = torch.stack([optimal_explanation(score(model, int(tb)), x[b:b + 1], pert[:, b:b + 1])[0]
                       for b, tb in enumerate(t)])
    torch.testing.assert_close(x * phi, occ, rtol=1e-9, atol=1e-12)


def coalitions(d):
    return torch.tensor(list(itertools.product([0, 1], repeat=d)), dtype=torch.float64)


def exact_shapley(value, d):
    """Shapley values of the game ``value(kept mask)`` by the subset formula (independent reference)."""
    z = coalitions(d)
    with torch.no_grad():
        v = value(z)
    index = {tuple(int(a) for a in row): i for i, row in enumerate(z)}
    phi = torch.zeros(d, dtype=torch.float64)
    for row, s in zip(z, z.sum(1)):
        for j in range(d):
            if row[j] == 0:
                w = math.factorial(int(s)) * math.factorial(d - int(s) - 1) / math.factorial(d)
                with_j = row.clone()
                with_j[j] = 1
                phi[j] += w * (v[index[tuple(int(a) for a in with_j)]] - v[index[tuple(int(a) for a in row)]])
    return phi


def shap_game(model, x, t):
    """v(S) = f(x with the features outside S set to 0), for one example x (1, 1, 3, 3)."""
    return lambda keep: model(x * keep.view(-1, *SHAPE))[:, t]


def test_prop_2_4_shap_kernel_weighting_gives_exact_shapley_values():
    """All 2^9 removal masks Z, weights pi(|Z|) of the SHAP kernel; the full mask's infinite
    weight (efficiency constraint) is 1e6: the constraint error falls as 1/weight (7.6e-9 at 1e3,
    7.6e-10 at 1e4) until the conditioning of the normal equations takes over (~2e-11 at 1e6)."""
    model, x = softplus_net(), inputs(1)
    phi_exact = exact_shapley(shap_game(model, x, 1), D)
    z = coalitions(D)[1:]  # drop the empty mask: I = 0 adds nothing
    size = z.sum(1)
    w = torch.where(size == D, torch.tensor(1e6, dtype=torch.float64), shap_kernel_weight(D, size.clamp(max=D - 1)))
    pert = (z.view(-1, 1, *SHAPE) * x.unsqueeze(0))
    phi = optimal_explanation(score(model, 1), x, pert, weights=w)
    torch.testing.assert_close((x * phi).flatten(), phi_exact, rtol=1e-7, atol=1e-9)
    with torch.no_grad():
        assert float(phi_exact.sum()) == pytest.approx(float(model(x)[0, 1] - model(torch.zeros_like(x))[0, 1]), rel=1e-10)


def test_prop_2_4_sampled_masks_and_captum_kernel_shap_converge_to_shapley():
    """Monte Carlo version: n masks drawn from the normalised kernel (size k w.p. ~ pi(k) C(d, k),
    then a uniform subset), equal weights, plus the efficiency constraint. Error model: R = 12
    independent replications; their mean must be within 5 standard errors of the exact values
    (standard error = replication spread / sqrt(R)). captum's KernelShap (the project's SHAP) must
    land within 6 of its own replication standard errors too (it also samples the kernel)."""
    model, x = softplus_net(), inputs(1)
    phi_exact = exact_shapley(shap_game(model, x, 0), D)
    sizes = torch.arange(1, D, dtype=torch.float64)
    p_size = shap_kernel_weight(D, sizes) * torch.tensor([math.comb(D, int(k)) for k in sizes], dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    reps = []
    for _ in range(12):
        k = sizes[torch.multinomial(p_size / p_size.sum(), 1000, replacement=True, generator=g)]
        ranks = torch.rand(1000, D, generator=g).argsort(1).argsort(1)
        z = (ranks < k.view(-1, 1)).double()
        z = torch.cat([z, torch.ones(1, D, dtype=torch.float64)])
        w = torch.ones(len(z), dtype=torch.float64)
        w[-1] = 1e6
        phi = optimal_explanation(score(model, 0), x, z.view(-1, 1, *SHAPE) * x.unsqueeze(0), weights=w)
        reps.append((x * phi).flatten())
    reps = torch.stack(reps)
    se = reps.std(0) / math.sqrt(len(reps))
    assert ((reps.mean(0) - phi_exact).abs() / se).max() < 5
    assert se.max() < 0.05 * phi_exact.abs().max()

    torch.manual_seed(6)
    shap = KernelShap(model)
    mask = torch.arange(D).view(1, *SHAPE)
    cap = torch.stack([shap.attribute(x, baselines=0.0, target=0, feature_mask=mask, n_samples=500).flatten()
                       for _ in range(8)])
    se = cap.std(0) / math.sqrt(len(cap))
    assert ((cap.mean(0) - phi_exact).abs() / se.clamp_min(1e-6 * phi_exact.abs().max())).max() < 6
