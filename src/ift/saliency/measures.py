"""Infidelity and max-sensitivity of explanations (Yeh et al. 2019), batched over perturbations.

Notation: ``f`` is the score of the explained class, ``Phi`` the explanation, ``I`` a random
perturbation. INFD(Phi, f, x) = E_I[(I^T Phi - (f(x) - f(x - I)))^2], after the optimal scaling
``Phi <- beta Phi`` with ``beta = E[I^T Phi * df] / E[(I^T Phi)^2]`` (Appendix B.1), which makes it
equal to captum's ``infidelity(normalize=True)``. SENS_max(Phi, f, x, r) = max_{||y - x||_inf <= r}
||Phi(y) - Phi(x)|| / ||Phi(x)||, estimated by Monte Carlo on uniform samples of the ball.

Everything is vectorised: perturbations are drawn as a ``(n, B, ...)`` tensor and evaluated in
chunks of at most ``max_batch`` rows per model call.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

PERTURBATIONS = ("noisy_baseline", "square")
SENS_NORMALISATIONS = ("input", "unit", "none", "input_2019")


# ----------------------------------------------------------------------------- helpers
def as_target(target: int | torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
    """Target as an int64 tensor of shape (B,), or None."""
    if target is None:
        return None
    if isinstance(target, int):
        return torch.full((batch,), target, dtype=torch.long, device=device)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be None, an int or a (B,) tensor, got {type(target).__name__}")
    target = target.to(device=device, dtype=torch.long).reshape(-1)
    if target.numel() == 1:
        return target.expand(batch).clone()
    if target.numel() != batch:
        raise ValueError(f"target has {target.numel()} entries but the batch has {batch} examples")
    return target


def scores(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
           target: torch.Tensor | None) -> torch.Tensor:
    """``forward(x)`` reduced to one score per row: ``(N,)`` as is, or ``(N, C)`` gathered at target."""
    out = forward(x)
    if out.dim() == 1:
        if target is not None:
            raise ValueError("forward returns (N,) scores, so target must be None "
                             "(or make forward return (N, C) logits)")
        return out
    if out.dim() == 2:
        if target is None:
            raise ValueError(f"forward returns {tuple(out.shape)} outputs: pass target= to pick a class")
        return out.gather(1, target.view(-1, 1)).squeeze(1)
    raise ValueError(f"forward must return (N,) scores or (N, C) logits, got shape {tuple(out.shape)}")


def chunk_sizes(n_samples: int, batch: int, max_batch: int) -> list[int]:
    """Split ``n_samples`` perturbations so each model call sees at most ``max_batch`` rows."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    k = max(1, max_batch // max(batch, 1))
    return [min(k, n_samples - i) for i in range(0, n_samples, k)]


def repeat_target(target: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """Target for ``k`` stacked copies of the batch (sample-major layout ``(k, B) -> k*B``)."""
    return None if target is None else target.repeat(k)


# ----------------------------------------------------------------------------- perturbations
def noisy_baseline_perturbations(x: torch.Tensor, n: int, sigma: float = 0.2, baseline: float = 0.0,
                                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``I = x - x0`` with the noisy baseline ``x0 = clip(baseline + sigma * eps, 0, 1)``; shape (n, B, ...).

    This is the perturbation of the authors' code: the perturbed input ``x - I = x0`` is a noisy
    black image that stays in the valid pixel range.
    """
    noise = torch.randn((n, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
    return x.unsqueeze(0) - (baseline + sigma * noise).clamp(0.0, 1.0)


def square_masks(height: int, width: int, sizes: Sequence[int] = (1, 10),
                 device: torch.device | None = None) -> torch.Tensor:
    """All square masks of side ``sizes[0]..sizes[1]`` at every position, shape (M, H*W), float.

    Sides larger than the image are skipped (e.g. 8x8 digits with sizes (1, 10) use sides 1..8).
    """
    lo, hi = int(sizes[0]), int(sizes[1])
    if lo < 1 or hi < lo:
        raise ValueError(f"square sizes must be (min_side >= 1, max_side >= min_side), got {tuple(sizes)}")
    masks = []
    for s in range(lo, min(hi, height, width) + 1):
        for i in range(height - s + 1):
            for j in range(width - s + 1):
                m = torch.zeros(height, width, device=device)
                m[i:i + s, j:j + s] = 1.0
                masks.append(m.flatten())
    if not masks:
        raise ValueError(f"no square of side {lo}..{hi} fits a {height}x{width} image")
    return torch.stack(masks)


def pick_squares(masks: torch.Tensor, n: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """All masks when ``n`` is None (the paper's choice), else ``n`` drawn uniformly with replacement."""
    if n is None:
        return masks
    idx = torch.randint(0, masks.shape[0], (n,), generator=generator, device=masks.device)
    return masks[idx]


# ----------------------------------------------------------------------------- infidelity
def optimal_scaling_infidelity(sum_aa: torch.Tensor, sum_ab: torch.Tensor, sum_bb: torch.Tensor,
                               n: int) -> torch.Tensor:
    """``min_beta mean((beta a - b)^2)`` from the sums of a*a, a*b, b*b (beta = 0 when a == 0)."""
    beta = torch.where(sum_aa > 0, sum_ab / sum_aa.clamp_min(torch.finfo(sum_aa.dtype).tiny),
                       torch.zeros_like(sum_aa))
    # the expanded square can round below zero; the true value is >= 0
    return ((beta * beta * sum_aa - 2 * beta * sum_ab + sum_bb) / n).clamp_min(0.0)


@torch.no_grad()
def perturbation_drops(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, perturbations: torch.Tensor,
                       target: int | torch.Tensor | None = None, max_batch: int = 4096) -> torch.Tensor:
    """``f(x) - f(x - I_k)`` for perturbations (n, B, ...), shape (n, B), float64. It does not depend
    on the explanation, so one call serves every explanation of the same examples."""
    if perturbations.shape[1:] != x.shape:
        raise ValueError(f"perturbations must have shape (n, *x.shape) = (n, {tuple(x.shape)}), "
                         f"got {tuple(perturbations.shape)}")
    batch = x.shape[0]
    target = as_target(target, batch, x.device)
    f_x = scores(forward, x, target).double()
    out, start = [], 0
    for k in chunk_sizes(perturbations.shape[0], batch, max_batch):
        pert = perturbations[start:start + k]
        start += k
        f_pert = scores(forward, (x.unsqueeze(0) - pert).flatten(0, 1), repeat_target(target, k))
        out.append(f_x.unsqueeze(0) - f_pert.view(k, batch).double())
    return torch.cat(out)


def scaled_infidelity(a: torch.Tensor, b: torch.Tensor, optimal_scaling: bool = True) -> torch.Tensor:
    """INFD from the dots ``a_k = I_k^T Phi`` and drops ``b_k`` (both (n, B)), per example."""
    sums = torch.stack([(a * a).sum(0), (a * b).sum(0), (b * b).sum(0)])
    if optimal_scaling:
        return optimal_scaling_infidelity(sums[0], sums[1], sums[2], a.shape[0])
    return (sums[0] - 2 * sums[1] + sums[2]) / a.shape[0]


@torch.no_grad()
def infidelity_from_perturbations(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                                  explanation: torch.Tensor, perturbations: torch.Tensor,
                                  target: int | torch.Tensor | None = None, max_batch: int = 4096,
                                  optimal_scaling: bool = True, drops: torch.Tensor | None = None) -> torch.Tensor:
    """INFD on given perturbations ``I`` of shape (n, B, *x.shape[1:]); returns (B,).
    ``drops``: ``perturbation_drops`` of the same perturbations, to skip the model calls."""
    if explanation.shape != x.shape:
        raise ValueError(f"explanation shape {tuple(explanation.shape)} != input shape {tuple(x.shape)}")
    if drops is None:
        drops = perturbation_drops(forward, x, perturbations, target, max_batch)
    elif drops.shape != perturbations.shape[:2]:
        raise ValueError(f"drops must be (n, B) = {tuple(perturbations.shape[:2])}, got {tuple(drops.shape)}")
    a = (perturbations * explanation.unsqueeze(0)).flatten(2).sum(-1).double()
    return scaled_infidelity(a, drops, optimal_scaling)


@torch.no_grad()
def square_drops(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, masks: torch.Tensor,
                 target: int | torch.Tensor | None = None, max_batch: int = 4096) -> torch.Tensor:
    """``f(x) - f(x * (1 - z_k))`` for square masks (n, H*W), shape (n, B), float64."""
    batch, c, h, w = x.shape
    if masks.shape[1] != h * w:
        raise ValueError(f"masks must be (n, H*W) = (n, {h * w}), got {tuple(masks.shape)}")
    target = as_target(target, batch, x.device)
    f_x = scores(forward, x, target).double()
    out, start = [], 0
    for k in chunk_sizes(masks.shape[0], batch, max_batch):
        keep = (1 - masks[start:start + k].to(x.dtype)).view(k, 1, 1, h, w)
        start += k
        f_pert = scores(forward, (x.unsqueeze(0) * keep).flatten(0, 1), repeat_target(target, k))
        out.append(f_x.unsqueeze(0) - f_pert.view(k, batch).double())
    return torch.cat(out)


@torch.no_grad()
def square_infidelity(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      attribution: torch.Tensor, masks: torch.Tensor,
                      target: int | torch.Tensor | None = None, max_batch: int = 4096,
                      drops: torch.Tensor | None = None) -> torch.Tensor:
    """INFD for square removal ``I = x * z`` in the binary form of Appendix B.2.

    ``attribution`` is the global attribution ``x * Phi`` (B, C, H, W); with ``I = x * z`` the dot
    ``I^T Phi = z^T (x * Phi)``, summed over channels because a square covers every channel.
    ``masks`` is (n, H*W); ``drops``: ``square_drops`` of the same masks, to skip the model calls.
    """
    if drops is None:
        drops = square_drops(forward, x, masks, target, max_batch)
    elif drops.shape != (masks.shape[0], x.shape[0]):
        raise ValueError(f"drops must be (n, B) = {(masks.shape[0], x.shape[0])}, got {tuple(drops.shape)}")
    a = masks.double() @ attribution.sum(1).flatten(1).double().T  # (n, B)
    return scaled_infidelity(a, drops)


def infidelity(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, explanation: torch.Tensor,
               perturbation: str = "noisy_baseline", n_samples: int | None = None,
               target: int | torch.Tensor | None = None, *, sigma: float = 0.2, baseline: float = 0.0,
               square_sizes: Sequence[int] = (1, 10), global_attribution: bool = False,
               max_batch: int = 4096, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-example INFD with optimal scaling, shape (B,).

    forward: ``x -> (N,)`` scores, or ``(N, C)`` logits together with ``target``.
    perturbation: ``"noisy_baseline"`` (``I = x - clip(baseline + sigma*eps, 0, 1)``, ``n_samples``
        draws, 1000 when None as in the paper) or ``"square"`` (remove a square of side
        ``square_sizes``; ``n_samples=None`` uses every square at every position, as the paper does,
        an integer draws that many squares uniformly).
    explanation: the local explanation ``Phi`` shaped like x; with ``global_attribution=True`` (square
        only) it is an attribution of removing each feature, like SHAP, compared as ``z^T Phi``.
    """
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if explanation.shape != x.shape:
        raise ValueError(f"explanation shape {tuple(explanation.shape)} != input shape {tuple(x.shape)}")
    if perturbation == "noisy_baseline":
        n_samples = 1000 if n_samples is None else n_samples
        if global_attribution:
            raise ValueError("global_attribution=True is defined for perturbation='square' only")
        pert = noisy_baseline_perturbations(x, n_samples, sigma, baseline, generator)
        return infidelity_from_perturbations(forward, x, explanation, pert, target, max_batch)
    masks = pick_squares(square_masks(x.shape[2], x.shape[3], square_sizes, x.device), n_samples, generator)
    attribution = explanation if global_attribution else x * explanation
    return square_infidelity(forward, x, attribution, masks, target, max_batch)


# ----------------------------------------------------------------------------- sensitivity
def call_explain(explain: Callable, x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    out = explain(x) if target is None else explain(x, target)
    if out.shape != x.shape:
        raise ValueError(f"explain must return a tensor shaped like its input {tuple(x.shape)}, "
                         f"got {tuple(out.shape)}")
    return out.detach()


def uniform_linf_noise(shape: Sequence[int], radius: float, like: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform samples of the L-infinity ball of the given radius."""
    u = torch.rand(tuple(shape), generator=generator, device=like.device, dtype=like.dtype)
    return (2 * u - 1) * radius


def max_sensitivity(explain: Callable, x: torch.Tensor, radius: float = 0.1, n_samples: int = 50,
                    target: int | torch.Tensor | None = None, *, normalize: str = "input",
                    max_batch: int = 4096, noise: torch.Tensor | None = None,
                    clip: tuple[float, float] | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-example SENS_max, shape (B,), by Monte Carlo over ``y = x + delta``, delta ~ U(L-inf ball).

    explain: ``x -> explanation shaped like x`` (or ``(x, target) -> ...`` when target is given);
        it is called on ``k*B`` rows at a time (perturbation-major), so it must be batched.
    normalize: ``"input"`` divides ``||Phi(y) - Phi(x)||`` by ``||Phi(x)||`` (captum's
        ``sensitivity_max`` and the authors' code as fixed in 2022); ``"unit"`` compares unit-norm
        explanations ``||Phi(y)/||Phi(y)|| - Phi(x)/||Phi(x)||||`` (the paper's Appendix B.1, at most 2);
        ``"none"`` is the raw L2 difference (Definition 3.1); ``"input_2019"`` replays the authors'
        2019 code, which divided the running maximum by ``||Phi(x)||`` after every sample
        (``m <- max(m, d_k) / ||Phi(x)||``, so it depends on the sample order): for comparing with the
        paper's numbers only.
    noise: optional fixed perturbations (n, *x.shape) instead of fresh samples (for common samples).
    clip: ``(lo, hi)`` scores ``y = clip(x + delta, lo, hi)``, i.e. only points of the valid pixel
        range (on MNIST's zero background half of every unclipped delta leaves [0, 1]); None: unclipped,
        the paper's definition.
    """
    return max_sensitivities(explain, x, radius, n_samples, target, normalizations=(normalize,),
                             max_batch=max_batch, noise=noise, clip=clip, generator=generator)[normalize]


def max_sensitivities(explain: Callable, x: torch.Tensor, radius: float = 0.1, n_samples: int = 50,
                      target: int | torch.Tensor | None = None, *, normalizations: Sequence[str] = ("input",),
                      max_batch: int = 4096, noise: torch.Tensor | None = None,
                      clip: tuple[float, float] | None = None,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """``max_sensitivity`` under several normalisations from the same samples (one explanation call
    per sample): ``{normalisation: (B,) tensor}``."""
    bad = [n for n in normalizations if n not in SENS_NORMALISATIONS]
    if bad or not normalizations:
        raise ValueError(f"normalize must be one of {SENS_NORMALISATIONS}, got {list(normalizations)!r}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if noise is not None:
        if noise.shape[1:] != x.shape:
            raise ValueError(f"noise must be (n, *x.shape), got {tuple(noise.shape)} for x {tuple(x.shape)}")
        n_samples = noise.shape[0]
    batch = x.shape[0]
    target = as_target(target, batch, x.device)
    base = call_explain(explain, x, target).flatten(1).double()
    base_norm = base.norm(dim=1)
    # a zero explanation is divided by 1, as captum does
    divisor = torch.where(base_norm > 0, base_norm, torch.ones_like(base_norm))
    base_unit = base / base_norm.clamp_min(1e-30).unsqueeze(1)
    worst = {n: torch.full((batch,), -torch.inf, dtype=torch.float64, device=x.device) for n in normalizations}
    start = 0
    for k in chunk_sizes(n_samples, batch, max_batch):
        delta = noise[start:start + k] if noise is not None else uniform_linf_noise((k, *x.shape), radius, x, generator)
        start += k
        y = x.unsqueeze(0) + delta
        if clip is not None:
            y = y.clamp(clip[0], clip[1])
        expl = call_explain(explain, y.flatten(0, 1), repeat_target(target, k))
        expl = expl.view(k, batch, -1).double()
        raw = (expl - base.unsqueeze(0)).norm(dim=2)  # (k, B)
        for name in normalizations:
            if name == "unit":
                unit = expl / expl.norm(dim=2, keepdim=True).clamp_min(1e-30)
                worst[name] = torch.maximum(worst[name], (unit - base_unit.unsqueeze(0)).norm(dim=2).max(0).values)
            elif name == "input_2019":
                for d in raw:  # in draw order: the running maximum is divided again after every sample
                    worst[name] = torch.maximum(worst[name], d) / divisor
            else:
                diff = raw / divisor if name == "input" else raw
                worst[name] = torch.maximum(worst[name], diff.max(0).values)
    return worst
