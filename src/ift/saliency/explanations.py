"""Explanations: captum's Grad / IG / GBP / KernelSHAP, uniform SmoothGrad, and the paper's optimal
explanations (Square, Noisy Baseline) by Monte-Carlo least squares.

An explanation is a callable ``(x, target) -> tensor shaped like x`` carrying two attributes:
``name`` and ``is_global``. Local explanations ``Phi`` are gradient-like (compare as ``I^T Phi``);
global ones are attributions of removing a feature (SHAP, Square), i.e. they play the role of
``x * Phi``. ``to_global`` converts a local explanation to the global one.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from captum.attr import GuidedBackprop, IntegratedGradients, KernelShap, Saliency
from torch import nn

from ift.saliency.measures import (as_target, chunk_sizes, noisy_baseline_perturbations, repeat_target,
                                   scores, square_drops, square_masks, uniform_linf_noise)

METHODS = ("Grad", "Grad-SG", "IG", "IG-SG", "GBP", "GBP-SG", "SHAP", "Square", "NB")
# controls, not explanations: "Constant" is Phi = 1 everywhere (it ignores the model), so its local
# SENS_max is exactly 0 and its global form x * 1 = x moves only by delta: the floor of the global measure
CONTROLS = ("Constant",)
# global SmoothGrad: ours x * mean Phi(x + d); the authors' code mean[(x + d) * Phi(x + d)]
SG_GLOBAL_VARIANTS = ("x_times_mean", "mean_of_products")


@dataclass
class Explanation:
    """A batched explanation ``fn(x, target)`` with its name and kind (local or global)."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    is_global: bool = False

    def __call__(self, x: torch.Tensor, target: torch.Tensor | int | None = None) -> torch.Tensor:
        target = as_target(target, x.shape[0], x.device)
        return self.fn(x, target).detach()


def to_global(explanation: Explanation) -> Explanation:
    """The global attribution ``x * Phi`` of a local explanation (a global one is returned as is)."""
    if explanation.is_global:
        return explanation
    return Explanation(explanation.name, lambda x, t: x * explanation.fn(x, t), is_global=True)


# ----------------------------------------------------------------------------- captum methods
@contextmanager
def quiet_captum():
    """Silence captum's per-call notices (inputs made to require grad, ReLU hooks, one Lime model
    per example): they are expected here and would flood the logs of batched Monte Carlo loops."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"captum\.")
        yield


def gradient(model: nn.Module) -> Explanation:
    """``Phi = grad_x f_target(x)`` (captum Saliency without the absolute value)."""
    sal = Saliency(model)

    def fn(x, t):
        with quiet_captum():
            return sal.attribute(x, target=t, abs=False)

    return Explanation("Grad", fn)


def integrated_gradients(model: nn.Module, n_steps: int = 20, baseline: float = 0.0,
                         multiply_by_inputs: bool = False, max_batch: int = 4096) -> Explanation:
    """Integrated gradients from a constant baseline.

    ``multiply_by_inputs=True`` is the usual IG attribution ``(x - b) * avg-grad`` (a global one);
    ``False`` is the path-averaged gradient, the local form the paper uses (its global form is
    again ``x * avg-grad`` when the baseline is 0). Left Riemann sum with alphas ``i / n_steps`` as
    in the authors' code (captum 0.9's ``riemann_trapezoid`` weights sum to (n-1)/n, not 1).
    """
    ig = IntegratedGradients(model, multiply_by_inputs=multiply_by_inputs)

    def fn(x, t):
        with quiet_captum():
            return ig.attribute(x, baselines=baseline, target=t, n_steps=n_steps, method="riemann_left",
                                internal_batch_size=max(x.shape[0], max_batch))

    return Explanation("IG", fn, is_global=multiply_by_inputs)


def guided_backprop(model: nn.Module) -> Explanation:
    """Guided Backprop; needs every ReLU to be its own ``nn.ReLU`` module."""
    if not any(isinstance(m, nn.ReLU) for m in model.modules()):
        raise ValueError("guided_backprop needs nn.ReLU modules in the model (functional ReLUs are "
                         "invisible to captum, GBP would silently be the plain gradient)")
    gbp = GuidedBackprop(model)

    def fn(x, t):
        with quiet_captum():
            return gbp.attribute(x, target=t)

    return Explanation("GBP", fn)


def kernel_shap(model: nn.Module, n_samples: int = 2000, baseline: float = 0.0,
                max_batch: int = 4096) -> Explanation:
    """KernelSHAP (captum) with one feature per pixel (all channels together); a global attribution.

    With a feature mask captum writes a pixel's whole attribution into each of its C channels, so
    we divide by C: the channel sum is then the pixel's Shapley value.
    """
    shap = KernelShap(model)

    def fn(x, t):
        b, c, h, w = x.shape
        mask = torch.arange(h * w, device=x.device).view(1, 1, h, w).expand(1, c, h, w)
        with quiet_captum():
            out = shap.attribute(x, baselines=baseline, target=t, feature_mask=mask, n_samples=n_samples,
                                 perturbations_per_eval=max(1, min(n_samples, max_batch)))
        return out / c

    return Explanation("SHAP", fn, is_global=True)


# ----------------------------------------------------------------------------- SmoothGrad
def smooth(explanation: Explanation, radius: float = 0.2, n_samples: int = 200, max_batch: int = 4096,
           generator: torch.Generator | None = None, multiply_by_inputs: bool = False) -> Explanation:
    """SmoothGrad with the paper's kernel: the mean of ``Phi(x + delta)``, delta uniform in the
    L-infinity ball of ``radius`` (no clamping to the pixel range, as in the authors' code).

    ``multiply_by_inputs=True`` returns the global explanation of the authors' code,
    ``mean[(x + delta) * Phi(x + delta)]`` (each sample times its own perturbed input), instead of
    ``to_global``'s ``x * mean Phi(x + delta)``; the two differ by ``mean[delta * Phi(x + delta)]``.
    """
    if radius < 0 or n_samples < 1:
        raise ValueError(f"smooth: radius must be >= 0 and n_samples >= 1, got {radius}, {n_samples}")
    if multiply_by_inputs and explanation.is_global:
        raise ValueError(f"smooth: multiply_by_inputs needs a local explanation, {explanation.name} is global")

    def fn(x, t):
        total = torch.zeros_like(x)
        for k in chunk_sizes(n_samples, x.shape[0], max_batch):
            points = (x.unsqueeze(0) + uniform_linf_noise((k, *x.shape), radius, x, generator)).flatten(0, 1)
            out = explanation.fn(points, repeat_target(t, k))
            if multiply_by_inputs:
                out = out * points
            total += out.view(k, *x.shape).sum(0)
        return total / n_samples

    return Explanation(explanation.name + "-SG", fn, explanation.is_global or multiply_by_inputs)


# ----------------------------------------------------------------------------- optimal explanations
def solve_normal_equations(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(G + ridge * tr(G)/d * Id)^-1 rhs`` batched; ridge 0 uses the pseudo-inverse (min-norm)."""
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if ridge == 0:
        return (torch.linalg.pinv(gram, hermitian=True) @ rhs.unsqueeze(-1)).squeeze(-1)
    d = gram.shape[-1]
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).unsqueeze(-1)
    eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * scale * eye, rhs.unsqueeze(-1)).squeeze(-1)


def optimal_noisy_baseline(model: nn.Module, n_samples: int = 20000, sigma: float = 0.2,
                           baseline: float = 0.0, ridge: float = 0.0, max_batch: int = 4096,
                           generator: torch.Generator | None = None) -> Explanation:
    """``Phi* = argmin_Phi mean_k (I_k^T Phi - (f(x) - f(x - I_k)))^2`` over noisy-baseline draws
    (Proposition 2.1 by Monte Carlo), a local explanation. Solved per example from the normal
    equations accumulated in float64 over chunks."""

    @torch.no_grad()
    def fn(x, t):
        b, d = x.shape[0], x[0].numel()
        f_x = scores(model, x, t).double()
        gram = torch.zeros(b, d, d, dtype=torch.float64, device=x.device)
        rhs = torch.zeros(b, d, dtype=torch.float64, device=x.device)
        for k in chunk_sizes(n_samples, b, max_batch):
            pert = noisy_baseline_perturbations(x, k, sigma, baseline, generator)
            df = f_x - scores(model, (x.unsqueeze(0) - pert).flatten(0, 1), repeat_target(t, k)).view(k, b).double()
            a = pert.flatten(2).double()  # (k, B, d)
            gram += torch.einsum("kbi,kbj->bij", a, a)
            rhs += torch.einsum("kbi,kb->bi", a, df)
        return solve_normal_equations(gram, rhs, ridge).view_as(x).to(x.dtype)

    return Explanation("NB", fn, is_global=False)


def optimal_square(model: nn.Module, square_sizes: Sequence[int] = (1, 10), n_samples: int | None = None,
                   ridge: float = 0.0, max_batch: int = 4096,
                   generator: torch.Generator | None = None) -> Explanation:
    """Optimal explanation for square removal in the form of Appendix B.2: solve for the global
    attribution ``a = x * Phi`` from ``min_a mean_k (z_k^T a - (f(x) - f(x * (1 - z_k))))^2``, where
    ``z_k`` are binary square masks (all of them when ``n_samples`` is None). ``Z^T Z`` is invertible
    once 1x1 squares are included, even where x has zeros. For C > 1 channels the pixel's
    attribution is split equally across channels."""

    @torch.no_grad()
    def fn(x, t):
        masks = square_masks(x.shape[2], x.shape[3], square_sizes, x.device)
        if n_samples is not None:
            masks = masks[torch.randint(0, masks.shape[0], (n_samples,), generator=generator, device=x.device)]
        drops = square_drops(model, x, masks, t, max_batch)
        return square_attribution(masks, drops, x.shape, ridge).to(x.dtype)

    return Explanation("Square", fn, is_global=True)


def square_attribution(masks: torch.Tensor, drops: torch.Tensor, shape: Sequence[int],
                       ridge: float = 0.0) -> torch.Tensor:
    """The Square solution from the masks (n, H*W) and the score drops (n, B) of ``square_drops``
    (float64, shaped ``shape``): the INFD's cached drops give the explanation without model calls."""
    b, c, h, w = shape
    z = masks.double()
    gram = (z.T @ z).expand(b, h * w, h * w)
    a = solve_normal_equations(gram, (z.T @ drops).T, ridge).view(b, 1, h, w) / c
    return a.expand(b, c, h, w).contiguous()


def constant(model: nn.Module | None = None) -> Explanation:
    """The control ``Phi = 1`` (shaped like x, independent of the model and of x): local SENS_max 0,
    global ``x * Phi = x``, whose SENS_max is ``||delta|| / ||x||`` (input normalisation)."""
    return Explanation("Constant", lambda x, t: torch.ones_like(x))


# ----------------------------------------------------------------------------- registry
def make_explanation(name: str, model: nn.Module, *, sg_radius: float = 0.2, sg_samples: int = 200,
                     ig_steps: int = 20, shap_samples: int = 2000, nb_samples: int = 20000,
                     nb_sigma: float = 0.2, square_sizes: Sequence[int] = (1, 10), ridge: float = 0.0,
                     max_batch: int = 4096, generator: torch.Generator | None = None,
                     sg_global: str | None = None) -> Explanation:
    """One of ``METHODS`` by name, with the paper's defaults (SG radius 0.2 and 200 samples, 20k
    samples for NB, squares of side 1..10).

    ``sg_global`` (``-SG`` methods only): None gives the local SmoothGrad; ``"x_times_mean"``
    the global ``x * mean Phi(x + delta)`` (ours); ``"mean_of_products"`` the authors' global
    ``mean[(x + delta) * Phi(x + delta)]``."""
    if sg_global not in (None, *SG_GLOBAL_VARIANTS):
        raise ValueError(f"sg_global must be None or one of {SG_GLOBAL_VARIANTS}, got {sg_global!r}")
    base = name[:-3] if name.endswith("-SG") else name
    if name not in METHODS + CONTROLS:
        raise ValueError(f"explanation must be one of {METHODS} or a control of {CONTROLS}, got {name!r}")
    if name == "Constant":
        return constant(model)
    if base == "Grad":
        expl = gradient(model)
    elif base == "IG":
        expl = integrated_gradients(model, ig_steps, max_batch=max_batch)
    elif base == "GBP":
        expl = guided_backprop(model)
    elif base == "SHAP":
        return kernel_shap(model, shap_samples, max_batch=max_batch)
    elif base == "Square":
        return optimal_square(model, square_sizes, ridge=ridge, max_batch=max_batch, generator=generator)
    else:
        return optimal_noisy_baseline(model, nb_samples, nb_sigma, ridge=ridge, max_batch=max_batch,
                                      generator=generator)
    if name.endswith("-SG"):
        expl = smooth(expl, sg_radius, sg_samples, max_batch, generator,
                      multiply_by_inputs=sg_global == "mean_of_products")
        if sg_global == "x_times_mean":
            expl = to_global(expl)
    return expl
