"""The appendix results of Yeh et al. 2019 as computable quantities, to check them on trained models.

- Propositions 2.1-2.4: ``optimal_explanation`` solves the (weighted) infidelity least squares for
  any given perturbations; ``shap_kernel_weight`` is the SHAP kernel that makes it the Shapley value.
- Definition C.1 / Theorem C.1: ``robust_infidelity`` (max over ``||u|| <= r`` of INFD at ``x + u``,
  the inner samples ``I_k`` fixed), the sensitivities ``A(x)``, ``B(x)``, ``B(x - I)`` and
  ``theorem_c1`` with the bound ``RINFD >= (max(0, A - B(x) - B(x - I)) / 2)^2``.
- A.2: ``hessian_norm_in_ball`` / ``hessian_norm_on_segments`` (power iteration on Hessian-vector
  products, maximised over sampled points) and ``gradient_bounds_a2``: SENS(Grad) <= L r and
  INFD(Grad) <= E[L_I^2 ||I||^4] / 4, where L bounds the input Hessian norm where it matters.
- Theorem A.1: ``theorem_a1``, the logistic adversarial loss against
  ``loss + eps ||grad f||_* + eps^2 / 2 * sup ||Hess f||`` (binary task).

Maxima over a ball are found by projected (sign, for L-inf) gradient ascent from several starts;
they are lower estimates of the true maxima. ``score_fn`` maps ``(N, ...)`` inputs to ``(N,)``
scores, one per row, rows independent (put BatchNorm in eval mode); ``class_score`` makes one from a
classifier and per-example targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ift.saliency.explanations import solve_normal_equations
from ift.saliency.networks import SoftplusMLP
from ift.saliency.probes import input_hessian_norm, softplus_gradient_lipschitz

NORMS = ("linf", "l2")
# piecewise-linear modules: a network using them has a zero input Hessian almost everywhere
PIECEWISE_LINEAR = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
                    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool2d)

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def class_score(model: nn.Module, target: torch.Tensor) -> ScoreFn:
    """The logit of class ``target[b]`` for example b, as a ``score_fn``. The functions here evaluate
    ``k`` stacked copies of a batch of B sample-major (row ``k * B + b``), so the target is repeated."""
    target = target.reshape(-1)

    def score(z: torch.Tensor) -> torch.Tensor:
        if len(z) % len(target):
            raise ValueError(f"class_score: {len(z)} rows are not a multiple of the batch {len(target)}")
        return model(z).gather(1, target.repeat(len(z) // len(target)).view(-1, 1)).squeeze(1)

    return score


# ----------------------------------------------------------------------------- refusals
def require_smooth(model: nn.Module, what: str) -> None:
    """Refuse a Hessian-based bound or regulariser on a piecewise-linear network."""
    bad = sorted({type(m).__name__ for m in model.modules() if isinstance(m, PIECEWISE_LINEAR)})
    if bad:
        raise ValueError(f"{what} needs a twice-differentiable network (e.g. arch=softplus_mlp): this one uses "
                         f"{', '.join(bad)}, so its input Hessian is zero almost everywhere and the bound/term is vacuous")


def require_bias_free_softplus(model: nn.Module, what: str) -> list[torch.Tensor]:
    """The weights of a bias-free SoftplusMLP (Proposition A.1's form), else a one-line refusal."""
    if not isinstance(model, SoftplusMLP) or any(m.bias is not None for m in model.net if isinstance(m, nn.Linear)):
        raise ValueError(f"{what} holds for bias-free Softplus MLPs only (arch=softplus_mlp without bias), "
                         f"got {type(model).__name__}")
    return model.weights()


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


# ----------------------------------------------------------------------------- Propositions 2.1-2.4
def optimal_explanation(score_fn: ScoreFn, x: torch.Tensor, perturbations: torch.Tensor,
                        weights: torch.Tensor | None = None, ridge: float = 0.0) -> torch.Tensor:
    """``argmin_Phi sum_k w_k (I_k^T Phi - (f(x) - f(x - I_k)))^2`` per example, shaped like x.

    perturbations: (n, B, *x.shape[1:]); weights: (n,) or None (uniform). Solved from the normal
    equations in float64 by the project's ``solve_normal_equations`` (Proposition 2.1:
    ``Phi* = (E[I I^T])^-1 E[I (f(x) - f(x - I))]``).
    """
    if perturbations.shape[1:] != x.shape:
        raise ValueError(f"perturbations must be (n, *x.shape), got {tuple(perturbations.shape)} for x {tuple(x.shape)}")
    n, b = perturbations.shape[:2]
    w = torch.ones(n, dtype=torch.float64, device=x.device) if weights is None else weights.double().to(x.device)
    if w.shape != (n,) or bool((w < 0).any()):
        raise ValueError(f"weights must be (n,) = ({n},) and >= 0, got shape {tuple(w.shape)}")
    with torch.no_grad():
        f_x = score_fn(x).double()
        f_pert = score_fn((x.unsqueeze(0) - perturbations).flatten(0, 1)).double().view(n, b)
    a = perturbations.flatten(2).double()
    gram = torch.einsum("k,kbi,kbj->bij", w, a, a)
    rhs = torch.einsum("k,kbi,kb->bi", w, a, f_x - f_pert)
    return solve_normal_equations(gram, rhs, ridge).view_as(x).to(x.dtype)


def shap_kernel_weight(d: int, size: torch.Tensor | int) -> torch.Tensor:
    """SHAP kernel ``(d - 1) / (C(d, |z|) |z| (d - |z|))`` of a coalition of ``|z|`` features,
    infinite for the empty and the full coalition (those are constraints)."""
    size = torch.as_tensor(size, dtype=torch.float64)
    binom = torch.exp(torch.lgamma(torch.tensor(d + 1.0, dtype=torch.float64)) - torch.lgamma(size + 1)
                      - torch.lgamma(d - size + 1))
    return (d - 1) / (binom * size * (d - size))


# ----------------------------------------------------------------------------- maximisation in a ball
def project(u: torch.Tensor, radius: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return u.clamp(-radius, radius)
    scale = (radius / u.flatten(1).norm(dim=1).clamp_min(1e-30)).clamp(max=1.0)
    return u * scale.view(-1, *([1] * (u.dim() - 1)))


def ascent_direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return g.sign()
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *([1] * (g.dim() - 1)))


@dataclass
class BallMax:
    """Per-example best value found and the ``u`` that reached it."""

    value: torch.Tensor
    u: torch.Tensor


def maximise_in_ball(objective: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, radius: float,
                     steps: int = 20, step_size: float | None = None, norm: str = "linf",
                     starts: Sequence[torch.Tensor] = (), n_random: int = 1,
                     generator: torch.Generator | None = None) -> BallMax:
    """``max_{||u|| <= radius} objective(u)`` per example by projected ascent (sign steps for L-inf,
    normalised gradient steps for L2) from ``u = 0``, the given ``starts`` and ``n_random`` uniform
    random points; the best value over every iterate is kept, so each start's value is a floor.

    objective: ``u (B, ...) -> (B,)``, differentiable, row b depending on ``u[b]`` only.
    """
    check_norm(norm)
    if radius < 0 or steps < 0:
        raise ValueError(f"radius and steps must be >= 0, got {radius}, {steps}")
    step_size = 2.5 * radius / max(steps, 1) if step_size is None else step_size
    inits = [torch.zeros_like(x), *[project(s.detach().to(x.dtype), radius, norm) for s in starts]]
    for _ in range(n_random):
        inits.append(project((2 * torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) - 1)
                             * radius, radius, norm))
    best = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
    best_u = torch.zeros_like(x)
    for u in inits:
        for it in range(steps + 1):
            with torch.enable_grad():
                u = u.detach().requires_grad_(it < steps)
                val = objective(u)
                grad = None
                if it < steps:  # an objective constant in u (e.g. A for a linear model) has no graph
                    grad = torch.autograd.grad(val.sum(), u, allow_unused=True)[0] if val.requires_grad else None
                    grad = torch.zeros_like(u) if grad is None else grad
            val = val.detach().double()
            better = val > best
            best = torch.where(better, val, best)
            best_u = torch.where(better.view(-1, *([1] * (x.dim() - 1))), u.detach(), best_u)
            if it < steps:
                u = project(u.detach() + step_size * ascent_direction(grad, norm), radius, norm)
    return BallMax(best, best_u)


# ----------------------------------------------------------------------------- Definition / Theorem C.1
def input_gradient(score_fn: ScoreFn, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """``grad_x f`` per row; with ``create_graph`` it can be differentiated again (w.r.t. x or weights)."""
    with torch.enable_grad():
        z = x if x.requires_grad else x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(score_fn(z).sum(), z, create_graph=create_graph)
    return g


def gradient_explainer(score_fn: ScoreFn) -> Callable[[torch.Tensor], torch.Tensor]:
    """Grad as a differentiable explanation ``x -> grad f(x)`` (its ascent needs double backprop)."""
    return lambda z: input_gradient(score_fn, z, create_graph=True)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(B, ...) -> (n*B, ...) sample-major copies, matching ``perturbations.flatten(0, 1)``."""
    return t.unsqueeze(0).expand(n, *t.shape).flatten(0, 1)


def infidelity_at(score_fn: ScoreFn, explain_fn: Callable, x: torch.Tensor, perturbations: torch.Tensor) -> torch.Tensor:
    """Unscaled INFD ``mean_k (I_k^T Phi(x) - (f(x) - f(x - I_k)))^2`` per row, differentiable in x."""
    n, b = perturbations.shape[:2]
    phi = explain_fn(x)
    dot = (perturbations * phi.unsqueeze(0)).flatten(2).sum(-1)
    df = score_fn(x).unsqueeze(0) - score_fn((_rows(x, n) - perturbations.flatten(0, 1))).view(n, b)
    return ((dot - df) ** 2).mean(0)


def robust_infidelity(score_fn: ScoreFn, explain_fn: Callable, x: torch.Tensor, perturbations: torch.Tensor,
                      radius: float, steps: int = 20, norm: str = "linf", starts: Sequence[torch.Tensor] = (),
                      n_random: int = 1, generator: torch.Generator | None = None) -> BallMax:
    """RINFD(x) = max_{||u|| <= r} INFD(Phi, f, x + u) (Definition C.1, no optimal scaling), with
    the samples ``I_k`` drawn once and kept while ``u`` moves. ``explain_fn`` must be differentiable
    (e.g. ``gradient_explainer``)."""
    return maximise_in_ball(lambda u: infidelity_at(score_fn, explain_fn, x + u, perturbations), x, radius, steps,
                            norm=norm, starts=starts, n_random=n_random, generator=generator)


def explanation_sensitivity_a(score_fn: ScoreFn, explain_fn: Callable, x: torch.Tensor, perturbations: torch.Tensor,
                              radius: float, steps: int = 20, norm: str = "linf", n_random: int = 1,
                              generator: torch.Generator | None = None) -> BallMax:
    """A(x) = max_u E_I |I^T Phi(x + u) - I^T Phi(x)| (Theorem C.1)."""
    phi_x = explain_fn(x).detach()

    def obj(u):
        diff = explain_fn(x + u) - phi_x
        return (perturbations * diff.unsqueeze(0)).flatten(2).sum(-1).abs().mean(0)

    return maximise_in_ball(obj, x, radius, steps, norm=norm, n_random=n_random, generator=generator)


def function_sensitivity_b(score_fn: ScoreFn, x: torch.Tensor, radius: float, perturbations: torch.Tensor | None = None,
                           steps: int = 20, norm: str = "linf", starts: Sequence[torch.Tensor] = (), n_random: int = 1,
                           generator: torch.Generator | None = None) -> BallMax:
    """B(x) = max_u |f(x + u) - f(x)|; with ``perturbations`` it is B(x - I) = max_u E_I |f(x + u - I) - f(x - I)|."""
    if perturbations is None:
        f_x = score_fn(x).detach()
        obj = lambda u: (score_fn(x + u) - f_x).abs()
    else:
        n, b = perturbations.shape[:2]
        base = _rows(x, n) - perturbations.flatten(0, 1)
        f_base = score_fn(base).detach()
        obj = lambda u: (score_fn(base + _rows(u, n)) - f_base).view(n, b).abs().mean(0)
    return maximise_in_ball(obj, x, radius, steps, norm=norm, starts=starts, n_random=n_random, generator=generator)


def theorem_c1(score_fn: ScoreFn, explain_fn: Callable, x: torch.Tensor, perturbations: torch.Tensor, radius: float,
               steps: int = 20, norm: str = "linf", n_random: int = 1,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """RINFD, A, B(x), B(x - I) and the bound ``(max(0, A - B(x) - B(x - I)) / 2)^2`` per example.

    A is maximised first; its maximiser ``u_A`` then seeds the other three ascents. The proof only
    uses the points ``u = 0`` and ``u = u_A``, so with that seeding the bound must hold exactly on
    the fixed samples even though every maximum here is an estimate.
    """
    a = explanation_sensitivity_a(score_fn, explain_fn, x, perturbations, radius, steps, norm, n_random, generator)
    seed = [a.u]
    b = function_sensitivity_b(score_fn, x, radius, None, steps, norm, seed, n_random, generator)
    b_shift = function_sensitivity_b(score_fn, x, radius, perturbations, steps, norm, seed, n_random, generator)
    rinfd = robust_infidelity(score_fn, explain_fn, x, perturbations, radius, steps, norm, seed, n_random, generator)
    with torch.enable_grad():
        infd0 = infidelity_at(score_fn, explain_fn, x, perturbations).detach().double()
    bound = ((a.value - b.value - b_shift.value).clamp_min(0) / 2) ** 2
    return {"rinfd": rinfd.value, "infd": infd0, "A": a.value, "B": b.value, "B_shift": b_shift.value, "bound": bound}


# ----------------------------------------------------------------------------- A.2 Hessian bounds
def _ball_points(x: torch.Tensor, radius: float, n_points: int, norm: str,
                 generator: torch.Generator | None) -> torch.Tensor:
    """x itself and ``n_points`` uniform points of the ball (L-inf: the cube; L2: the ball), (n+1, B, ...)."""
    d = x[0].numel()
    if norm == "linf":
        u = (2 * torch.rand((n_points, *x.shape), generator=generator, dtype=x.dtype, device=x.device) - 1) * radius
    else:
        g = torch.randn((n_points, *x.shape), generator=generator, dtype=x.dtype, device=x.device)
        r = torch.rand((n_points, x.shape[0]), generator=generator, dtype=x.dtype, device=x.device) ** (1 / d)
        u = g / g.flatten(2).norm(dim=2).view(n_points, -1, *([1] * (x.dim() - 1))) \
            * (radius * r).view(n_points, -1, *([1] * (x.dim() - 1)))
    return torch.cat([x.unsqueeze(0), x.unsqueeze(0) + u])


def hessian_norm_in_ball(score_fn: ScoreFn, x: torch.Tensor, radius: float, n_points: int = 32, norm: str = "linf",
                         iters: int = 30, generator: torch.Generator | None = None) -> torch.Tensor:
    """Estimate of ``sup_{||d|| <= r} ||Hess f(x + d)||_2`` per example: the largest spectral norm (power
    iteration on HVPs, ``probes.input_hessian_norm``) over x and ``n_points`` uniform points of the ball."""
    check_norm(norm)
    pts = _ball_points(x, radius, n_points, norm, generator)
    h = input_hessian_norm(score_fn, pts.flatten(0, 1), iters=iters, generator=generator)
    return h.view(n_points + 1, x.shape[0]).max(0).values.double()


def hessian_norm_on_segments(score_fn: ScoreFn, x: torch.Tensor, perturbations: torch.Tensor, n_grid: int = 5,
                             iters: int = 30, generator: torch.Generator | None = None) -> torch.Tensor:
    """Estimate of ``sup_{t in [0, 1]} ||Hess f(x - t I_k)||_2`` for every sample, shape (n, B), from
    ``n_grid`` equally spaced points of each segment (the set that INFD's Taylor remainder sees)."""
    n, b = perturbations.shape[:2]
    ts = torch.linspace(0, 1, n_grid, dtype=x.dtype, device=x.device).view(-1, 1, 1, *([1] * (x.dim() - 1)))
    pts = x.view(1, 1, *x.shape) - ts * perturbations.unsqueeze(0)  # (grid, n, B, ...)
    h = input_hessian_norm(score_fn, pts.flatten(0, 2), iters=iters, generator=generator)
    return h.view(n_grid, n, b).max(0).values.double()


def gradient_sensitivity(score_fn: ScoreFn, x: torch.Tensor, radius: float, steps: int = 20, norm: str = "linf",
                         n_random: int = 2, generator: torch.Generator | None = None) -> BallMax:
    """Unnormalised SENS_max(Grad) = max_u ||grad f(x + u) - grad f(x)||_2 by projected ascent."""
    g_x = input_gradient(score_fn, x).detach()
    explain = gradient_explainer(score_fn)
    return maximise_in_ball(lambda u: (explain(x + u) - g_x).flatten(1).norm(dim=1), x, radius, steps, norm=norm,
                            n_random=n_random, generator=generator)


def l2_radius(radius: float, d: int, norm: str) -> float:
    """The L2 radius of the ball: ``r`` for L2, ``r sqrt(d)`` for the L-inf cube."""
    return radius * math.sqrt(d) if norm == "linf" else radius


def gradient_bounds_a2(model: nn.Module, score_fn: ScoreFn, x: torch.Tensor, radius: float, perturbations: torch.Tensor,
                       norm: str = "linf", hess_points: int = 32, seg_grid: int = 5, ascent_steps: int = 20,
                       sens_samples: int = 50, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A.2 for Grad, per example: measured sensitivity and INFD against their Hessian bounds.

    - ``sens_ascent`` / ``sens_mc``: max ||grad f(x + u) - grad f(x)||_2 over the ball (ascent; uniform
      samples as in SENS_max) against ``sens_bound = L_ball * R`` (R the ball's L2 radius; L_ball the
      sampled Hessian-norm maximum, an estimate from below of the sup, so this bound can fail where
      the samples miss the curvature), ``sens_bound_path = L_path ||u*||_2`` (L_path the Hessian-norm
      maximum on a grid of the segment from x to the ascent's maximiser u*: the mean value theorem)
      and ``sens_bound_a1 = L_A1 * R`` (Proposition A.1's certified global constant, for bias-free
      Softplus MLPs; NaN otherwise).
    - ``infd``: unscaled INFD of Grad on ``perturbations`` against ``infd_bound = mean_k L_k^2 ||I_k||^4 / 4``
      (L_k the Hessian-norm maximum on segment k) and the paper's single-constant form
      ``infd_bound_paper = max_k L_k^2 * mean_k ||I_k||^4 / 4``.
    """
    require_smooth(model, "the A.2 Hessian bound")
    from ift.saliency.measures import max_sensitivity, uniform_linf_noise

    d = x[0].numel()
    big_r = l2_radius(radius, d, norm)
    l_ball = hessian_norm_in_ball(score_fn, x, radius, hess_points, norm, generator=generator)
    try:
        l_a1 = softplus_gradient_lipschitz(require_bias_free_softplus(model, "Proposition A.1"))
    except ValueError:
        l_a1 = math.nan
    worst = gradient_sensitivity(score_fn, x, radius, ascent_steps, norm, generator=generator)
    sens = worst.value
    # mean value theorem along the maximiser's own segment: a bound that no sampling of the ball can miss
    l_path = hessian_norm_on_segments(score_fn, x, -worst.u.unsqueeze(0), seg_grid * 4, generator=generator)[0]
    explain = lambda z: input_gradient(score_fn, z)
    noise = uniform_linf_noise((sens_samples, *x.shape), radius, x, generator) if norm == "linf" else \
        (_ball_points(x, radius, sens_samples, norm, generator)[1:] - x.unsqueeze(0))
    sens_mc = max_sensitivity(explain, x, radius, normalize="none", noise=noise)
    l_seg = hessian_norm_on_segments(score_fn, x, perturbations, seg_grid, generator=generator)
    i4 = perturbations.flatten(2).double().norm(dim=2) ** 4
    with torch.enable_grad():
        infd = infidelity_at(score_fn, explain, x, perturbations).detach().double()
    return {"sens_ascent": sens, "sens_mc": sens_mc, "L_ball": l_ball, "sens_bound": l_ball * big_r,
            "L_path": l_path, "sens_bound_path": l_path * worst.u.flatten(1).double().norm(dim=1),
            "sens_bound_a1": torch.full_like(sens, l_a1 * big_r), "infd": infd,
            "infd_bound": (l_seg ** 2 * i4).mean(0) / 4, "infd_bound_paper": l_seg.max(0).values ** 2 * i4.mean(0) / 4,
            "grad_norm": input_gradient(score_fn, x).flatten(1).norm(dim=1).double()}


# ----------------------------------------------------------------------------- Theorem A.1
def logistic_loss(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``-log sigmoid((2y - 1) f)`` for labels y in {0, 1}."""
    return nn.functional.softplus(-(2 * y.to(f.dtype) - 1) * f)


def theorem_a1(model: nn.Module, logit_fn: ScoreFn, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
               attack_steps: int = 50, restarts: int = 3, hess_points: int = 32,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Theorem A.1 per example (binary logistic loss, ``logit_fn: x -> (B,)``):
    ``max_{||d|| <= eps} loss(f(x + d), y) <= loss(f(x), y) + eps ||grad f(x)||_* + eps^2 / 2 * M``.

    ``||.||_*`` is the dual norm (L1 for the L-inf ball, L2 for L2). ``M`` bounds ``d^T Hess d / eps^2``
    over the ball: ``L_ball`` for L2 and ``d * L_ball`` for L-inf (``||d||_2^2 <= d eps^2``), with
    ``L_ball`` the sampled spectral-norm maximum. The left side is measured by projected ascent
    without clamping to the pixel range (the theorem's ball).
    """
    require_smooth(model, "Theorem A.1's Hessian term")
    check_norm(norm)
    d = x[0].numel()
    f_x = logit_fn(x).detach()
    nat = logistic_loss(f_x, y).double()
    g = input_gradient(logit_fn, x).flatten(1).double()
    grad_term = eps * (g.abs().sum(1) if norm == "linf" else g.norm(dim=1))
    l_ball = hessian_norm_in_ball(logit_fn, x, eps, hess_points, norm, generator=generator)
    hess_term = eps ** 2 / 2 * l_ball * (d if norm == "linf" else 1)
    adv = maximise_in_ball(lambda u: logistic_loss(logit_fn(x + u), y), x, eps, attack_steps, norm=norm,
                           n_random=restarts, generator=generator).value
    return {"natural_loss": nat, "adv_loss": adv, "grad_term": grad_term, "hess_term": hess_term,
            "rhs": nat + grad_term + hess_term, "L_ball": l_ball}
