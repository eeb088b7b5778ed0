"""Matrix-free linear operators built from autograd: the Jacobian / Hessian products the IFT needs."""

from __future__ import annotations

from typing import Callable

import torch


def hvp(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, v: torch.Tensor,
        create_graph: bool = False) -> torch.Tensor:
    """Hessian-vector product ``d^2 f(x) v`` of a scalar function ``f`` at ``x`` (double backward).

    With ``create_graph=True`` the product keeps its graph (to ``x``, ``v`` and whatever ``f``
    closes over) so it can be differentiated again; by default it is a plain tensor.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True) if not x.requires_grad else x
        (g,) = torch.autograd.grad(f(x), x, create_graph=True)
        (hv,) = torch.autograd.grad(g, x, grad_outputs=v, create_graph=create_graph)
    return hv


def power_iteration(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    v0: torch.Tensor,
    iters: int = 20,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dominant eigenvalue (largest magnitude) of a symmetric operator, batched over dim 0.

    Returns ``(eigenvalue per batch row, eigenvector)``. Rows keep their own normalisation.
    Iterates are detached, so a ``matvec`` built on autograd does not grow a graph across
    iterations. With eigenvalues ``+l`` and ``-l`` of equal magnitude the iteration does not
    converge; iterate on ``matvec(matvec(v))`` (eigenvalue ``l^2``) in that case.
    """
    if iters < 1:
        raise ValueError(f"power_iteration: iters must be >= 1, got {iters}")
    dims = tuple(range(1, v0.dim()))

    def normalise(v: torch.Tensor) -> torch.Tensor:
        norm = v.flatten(1).norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
        return v / norm.view(-1, *([1] * len(dims)))

    v = normalise(v0)
    eig = torch.zeros(v0.shape[0], dtype=v0.dtype, device=v0.device)
    for _ in range(iters):
        w = matvec(v).detach()
        new_eig = (w * v).sum(dim=dims)
        v = normalise(w)
        converged = (new_eig - eig).abs() <= tol * new_eig.abs().clamp_min(1e-12)
        eig = new_eig
        if bool(converged.all()):
            break
    return eig.detach(), v.detach()
