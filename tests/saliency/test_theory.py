"""ift.saliency.theory against closed forms: ball maxima of linear functions, RINFD / A / B of linear
and quadratic models, Theorem C.1 on fixed samples, the A.2 and Theorem A.1 bounds, refusals."""

import math

import pytest
import torch
from torch import nn

from ift.saliency import build_network
from ift.saliency.measures import noisy_baseline_perturbations
from ift.saliency.theory import (explanation_sensitivity_a, function_sensitivity_b, gradient_bounds_a2,
                                 gradient_explainer, hessian_norm_in_ball, hessian_norm_on_segments,
                                 logistic_loss, maximise_in_ball, optimal_explanation, require_bias_free_softplus,
                                 robust_infidelity, theorem_a1, theorem_c1)

SHAPE = (1, 2, 3)
D = 6


class Quadratic(nn.Module):
    """``f(x) = x^T Q x / 2 + b^T x`` per row, shape (N,)."""

    def __init__(self, seed=0, scale=1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(D, D, generator=g, dtype=torch.float64)
        self.q = scale * (a + a.T) / 2
        self.b = torch.randn(D, generator=g, dtype=torch.float64)

    def forward(self, x):
        z = x.flatten(1)
        return 0.5 * ((z @ self.q) * z).sum(1) + z @ self.b


class Wiggly(nn.Module):
    """``f(x) = c sin(k w^T x) / k``: a gradient that turns fast while f barely moves (so Theorem
    C.1's bound is not vacuous)."""

    def __init__(self, k=40.0, c=1.0):
        super().__init__()
        self.w = torch.linspace(-1, 1, D, dtype=torch.float64)
        self.k, self.c = k, c

    def forward(self, x):
        return self.c * torch.sin(self.k * x.flatten(1) @ self.w) / self.k


def inputs(b=3, seed=1):
    return torch.rand(b, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_ball_maximum_of_a_linear_function_is_the_dual_norm(norm):
    w = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = maximise_in_ball(lambda u: (w * u).flatten(1).sum(1), inputs(), 0.3, steps=10, norm=norm)
    dual = w.flatten(1).abs().sum(1) if norm == "linf" else w.flatten(1).norm(dim=1)
    torch.testing.assert_close(res.value, 0.3 * dual)
    bound = res.u.flatten(1).abs().max(1).values if norm == "linf" else res.u.flatten(1).norm(dim=1)
    assert (bound <= 0.3 + 1e-12).all()


def test_rinfd_of_grad_on_a_quadratic_is_its_infd():
    """For a quadratic, ``I^T grad f(x + u) - (f(x + u) - f(x + u - I)) = I^T Q I / 2`` whatever u."""
    f, x = Quadratic(), inputs()
    pert = noisy_baseline_perturbations(x, 64, generator=torch.Generator().manual_seed(2))
    res = robust_infidelity(f, gradient_explainer(f), x, pert, radius=0.1, steps=5)
    a = pert.flatten(2)
    expected = ((0.5 * ((a @ f.q) * a).sum(-1)) ** 2).mean(0)
    torch.testing.assert_close(res.value, expected)


def test_rinfd_ascent_beats_a_grid_search():
    """d = 2 (a 1x1x2 input): the ascent maximum is at least the best point of a 41x41 grid, within 1%."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(2, 8), nn.Softplus(), nn.Linear(8, 1)).double()
    f = lambda z: net(z).squeeze(1)
    x = torch.tensor([[[[0.3, 0.7]]]], dtype=torch.float64)
    pert = noisy_baseline_perturbations(x, 32, generator=torch.Generator().manual_seed(3))
    res = robust_infidelity(f, gradient_explainer(f), x, pert, radius=0.5, steps=40, n_random=3)
    from ift.saliency.theory import infidelity_at
    grid = torch.linspace(-0.5, 0.5, 41, dtype=torch.float64)
    best = max(float(infidelity_at(f, gradient_explainer(f), x + torch.stack([a, b]).view(1, 1, 1, 2), pert).detach())
               for a in grid for b in grid)
    assert float(res.value) >= 0.99 * best


def test_a_and_b_sensitivities_closed_forms():
    """Linear f = w^T x: A = 0 and B = B(x - I) = r ||w||_1. Quadratic with one sample I: the
    gradient moves by Q u, so A = r ||Q I||_1."""
    w = torch.linspace(-1, 2, D, dtype=torch.float64)
    lin = lambda z: z.flatten(1) @ w
    x, r = inputs(), 0.2
    pert = noisy_baseline_perturbations(x, 16, generator=torch.Generator().manual_seed(4))
    assert explanation_sensitivity_a(lin, gradient_explainer(lin), x, pert, r, steps=5).value.abs().max() < 1e-12
    torch.testing.assert_close(function_sensitivity_b(lin, x, r, steps=5).value, torch.full((3,), r * w.abs().sum().item(), dtype=torch.float64))
    torch.testing.assert_close(function_sensitivity_b(lin, x, r, pert, steps=5).value, torch.full((3,), r * w.abs().sum().item(), dtype=torch.float64))
    f = Quadratic()
    one = pert[:1]
    a = explanation_sensitivity_a(f, gradient_explainer(f), x, one, r, steps=10).value
    torch.testing.assert_close(a, r * (one[0].flatten(1) @ f.q).abs().sum(1))


@pytest.mark.parametrize("model", ["quadratic", "wiggly", "softplus"])
def test_theorem_c1_bound_holds_on_fixed_samples(model):
    x = inputs(4)
    if model == "softplus":
        torch.manual_seed(0)
        net = build_network("softplus_mlp", SHAPE, 3, hidden=(16,)).double()
        f = lambda z: net(z)[:, 1]
    else:
        f = Quadratic(scale=3.0) if model == "quadratic" else Wiggly()
    pert = noisy_baseline_perturbations(x, 32, generator=torch.Generator().manual_seed(5))
    out = theorem_c1(f, gradient_explainer(f), x, pert, radius=0.1, steps=15, generator=torch.Generator().manual_seed(6))
    assert (out["rinfd"] >= out["bound"] * (1 - 1e-9)).all(), out
    assert (out["rinfd"] >= out["infd"] - 1e-12).all()
    if model == "wiggly":  # the explanation is far more sensitive than f: the bound bites
        assert (out["bound"] > 0.05 * out["rinfd"]).all(), out


def test_a2_bounds_on_a_quadratic_are_exact_where_they_should_be():
    f, x = Quadratic(), inputs()
    q_norm = torch.linalg.matrix_norm(f.q, 2)
    torch.testing.assert_close(hessian_norm_in_ball(f, x, 0.1, n_points=4, iters=200), q_norm.expand(3), rtol=1e-6, atol=0)
    pert = noisy_baseline_perturbations(x, 8, generator=torch.Generator().manual_seed(7))
    seg = hessian_norm_on_segments(f, x, pert, n_grid=3, iters=200)
    torch.testing.assert_close(seg, q_norm.expand(8, 3), rtol=1e-6, atol=0)
    out = gradient_bounds_a2(f, f, x, 0.1, pert, generator=torch.Generator().manual_seed(8))
    assert (out["sens_ascent"] <= out["sens_bound"] * (1 + 1e-6)).all()
    assert (out["sens_ascent"] <= out["sens_bound_path"] * (1 + 1e-6)).all()
    assert (out["sens_mc"] <= out["sens_ascent"] * (1 + 1e-6)).all()  # ascent finds a vertex, MC an interior point
    assert (out["infd"] <= out["infd_bound"] * (1 + 1e-6)).all() and (out["infd_bound"] <= out["infd_bound_paper"] * (1 + 1e-9)).all()
    assert torch.isnan(out["sens_bound_a1"]).all()  # no Proposition A.1 constant for a non-MLP


def test_a2_bounds_hold_on_a_bias_free_softplus_mlp_with_the_certified_constant():
    torch.manual_seed(1)
    net = build_network("softplus_mlp", SHAPE, 3, hidden=(16, 16)).double()
    f = lambda z: net(z)[:, 0]
    x = inputs()
    pert = noisy_baseline_perturbations(x, 16, generator=torch.Generator().manual_seed(9))
    out = gradient_bounds_a2(net, f, x, 0.1, pert, generator=torch.Generator().manual_seed(10))
    assert (out["sens_ascent"] <= out["sens_bound_a1"]).all() and (out["sens_ascent"] <= out["sens_bound"]).all()
    assert (out["sens_ascent"] <= out["sens_bound_path"] * (1 + 1e-9)).all()
    assert (out["L_ball"] <= out["sens_bound_a1"] / (0.1 * math.sqrt(D))).all()  # sampled L <= certified L
    assert (out["infd"] <= out["infd_bound"]).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_theorem_a1_on_a_linear_logit_is_tight(norm):
    """No curvature: the worst loss is ``loss(f(x) - (2y - 1) eps ||w||_*, y)``, at most loss + eps ||w||_*."""
    w = torch.linspace(-1, 2, D, dtype=torch.float64)
    net = nn.Sequential(nn.Flatten(), nn.Linear(D, 1, bias=False)).double()
    net[1].weight.data = w.view(1, -1)
    logit = lambda z: net(z).squeeze(1)
    x, y = inputs(4), torch.tensor([0, 1, 1, 0])
    out = theorem_a1(net, logit, x, y, 0.1, norm=norm, attack_steps=10)
    dual = w.abs().sum() if norm == "linf" else w.norm()
    worst = logistic_loss(logit(x).detach() - (2 * y - 1) * 0.1 * dual, y)
    torch.testing.assert_close(out["adv_loss"], worst)
    assert out["hess_term"].abs().max() < 1e-12 and (out["adv_loss"] <= out["rhs"] + 1e-12).all()


def test_theorem_a1_holds_on_a_softplus_network():
    torch.manual_seed(2)
    net = build_network("softplus_mlp", SHAPE, 1, hidden=(16,)).double()
    logit = lambda z: net(z).squeeze(1)
    x, y = inputs(6), torch.tensor([0, 1, 0, 1, 1, 0])
    for norm in ("linf", "l2"):
        out = theorem_a1(net, logit, x, y, 0.2, norm=norm, attack_steps=20, generator=torch.Generator().manual_seed(3))
        assert (out["adv_loss"] >= out["natural_loss"]).all() and (out["adv_loss"] <= out["rhs"]).all()


def test_bounds_refuse_piecewise_linear_networks_and_bad_input():
    cnn = build_network("small_cnn", (1, 8, 8), 3)
    f = lambda z: cnn(z)[:, 0]
    x = torch.rand(2, 1, 8, 8)
    pert = noisy_baseline_perturbations(x, 4)
    with pytest.raises(ValueError, match="twice-differentiable.*ReLU"):
        gradient_bounds_a2(cnn, f, x, 0.1, pert)
    with pytest.raises(ValueError, match="twice-differentiable"):
        theorem_a1(cnn, f, x, torch.tensor([0, 1]), 0.1)
    with pytest.raises(ValueError, match="bias-free"):
        require_bias_free_softplus(build_network("softplus_mlp", (1, 8, 8), 3, bias=True), "Proposition A.1")
    with pytest.raises(ValueError, match="norm"):
        maximise_in_ball(lambda u: u.sum(), x, 0.1, norm="l1")
    with pytest.raises(ValueError, match="perturbations"):
        optimal_explanation(f, x, pert[:, :1])


def test_class_score_repeats_targets_over_stacked_copies():
    torch.manual_seed(0)
    net = build_network("softplus_mlp", SHAPE, 3, hidden=(4,)).double()
    from ift.saliency.theory import class_score
    x, y = inputs(2), torch.tensor([2, 0])
    f = class_score(net, y)
    stacked = torch.cat([x, x + 0.1, x - 0.1])
    expected = torch.cat([net(z)[torch.arange(2), y] for z in (x, x + 0.1, x - 0.1)])
    torch.testing.assert_close(f(stacked), expected)
    with pytest.raises(ValueError, match="multiple of the batch"):
        f(stacked[:5])
