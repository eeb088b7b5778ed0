"""Robustness verification of an L-inf robust classifier: multi-restart PGD, the accuracy-vs-eps curve,
and the gradient-masking checks of Athalye et al. 2018 / Carlini et al. 2019 (accuracy must fall as
eps grows and reach about zero at a radius that can erase the image; a transfer or gradient-free
attack must not beat white-box PGD).

Every function returns per-example outcomes so that attacks combine as a per-example worst case:
an example counts as robust only if no attack (and no restart) fooled the model.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ift.saliency.pgd import pgd_attack


@torch.no_grad()
def correct(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Per-example ``argmax net(x) == y`` (bool), in eval mode."""
    net.eval()
    return torch.cat([net(x[i:i + batch]).argmax(1) == y[i:i + batch] for i in range(0, len(x), batch)])


def pgd_robust(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
               restarts: int, batch: int = 500, seed: int = 0, source: nn.Module | None = None) -> torch.Tensor:
    """Per-example: correct on x and under every one of ``restarts`` random-start PGD runs.

    Each restart attacks only the examples still standing (the others are already broken).
    ``source``: craft the examples on this model instead (a transfer, i.e. black-box, attack) and
    evaluate them on ``net``."""
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    attacker = net if source is None else source
    attacker.eval()
    alive = correct(net, x, y)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(restarts):
        idx = alive.nonzero().squeeze(1)
        for i in range(0, len(idx), batch):
            part = idx[i:i + batch]
            adv = pgd_attack(attacker, x[part], y[part], eps, step_size, steps, generator=gen)
            alive[part] = correct(net, adv, y[part])
    return alive


def square_robust(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, queries: int,
                  batch: int = 500, seed: int = 0) -> torch.Tensor:
    """Per-example robustness to the gradient-free Square Attack (Andriushchenko et al. 2020, L-inf,
    margin loss) from ``torchattacks`` (optional: ``pip install --no-deps torchattacks==3.5.1``)."""
    try:
        import torchattacks
    except ImportError as err:
        raise ImportError("square_robust needs torchattacks: pip install --no-deps torchattacks==3.5.1") from err
    net.eval()
    attack = torchattacks.Square(net, norm="Linf", eps=eps, n_queries=queries, n_restarts=1, seed=seed)
    alive = correct(net, x, y)
    idx = alive.nonzero().squeeze(1)
    for i in range(0, len(idx), batch):
        part = idx[i:i + batch]
        alive[part] = correct(net, attack(x[part], y[part]), y[part])
    return alive


def accuracy_curve(robust_at: Callable[[float], torch.Tensor], radii: Sequence[float]) -> list[dict]:
    """``[{"eps", "accuracy", "n"}]`` of ``robust_at(eps)`` (per-example bools) over the radii."""
    rows = []
    for eps in radii:
        ok = robust_at(float(eps))
        rows.append({"eps": float(eps), "accuracy": float(ok.float().mean()), "n": len(ok)})
    return rows


def masking_checks(curve: list[dict], white_box: torch.Tensor, others: dict[str, torch.Tensor],
                   zero_radius: float = 0.5, tol: float = 0.01) -> dict:
    """The gradient-masking checks, each with its verdict.

    - ``monotone``: accuracy never rises by more than ``tol`` as eps grows (a stronger attack budget
      cannot help the model unless the attack is failing);
    - ``vanishes``: accuracy at the first radius >= ``zero_radius`` is at most ``tol`` (at eps 0.5 an
      MNIST image can be moved to uniform grey, so a sound attack reaches ~0);
    - ``<name>_not_stronger``: an other attack (transfer, gradient-free, larger step) does not break
      more examples than white-box PGD, up to ``tol`` accuracy; ``<name>_extra_broken`` counts the
      examples it broke that PGD did not (they are removed from the combined worst case anyway); an
      attack run on the first n examples only is compared with PGD on those n.
    """
    accs = [row["accuracy"] for row in curve]
    out = {"monotone": all(b <= a + tol for a, b in zip(accs, accs[1:]))}
    big = [row for row in curve if row["eps"] >= zero_radius]
    out["vanishes"] = bool(big) and big[0]["accuracy"] <= tol
    for name, ok in others.items():
        n = min(len(ok), len(white_box))  # an attack run on the first n examples is compared on those
        out[f"{name}_not_stronger"] = float(ok[:n].float().mean()) >= float(white_box[:n].float().mean()) - tol
        out[f"{name}_extra_broken"] = int((white_box[:n] & ~ok[:n]).sum())
    out["passed"] = all(v for k, v in out.items() if not k.endswith("_extra_broken"))
    return out
