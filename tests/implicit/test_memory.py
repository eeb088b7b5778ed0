"""Bytes saved for backward (saved_tensors_hooks): flat in solver iterations for the IFT, linear unrolled."""

import pytest
import torch

from ift.implicit import implicit_argmin, implicit_fixed_point, implicit_root
from ift.implicit.examples import (
    ridge_gradient_descent,
    ridge_hypergradient_closed_form,
    ridge_objective,
    ridge_validation_loss,
)

DT = torch.float64


class SavedBytes:
    """Sum of ``numel * element_size`` of every tensor autograd packs for backward inside the block."""

    def __init__(self):
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        self.bytes += t.numel() * t.element_size()
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def ridge_data(seed=0, n=30, d=12):
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(n, d, dtype=DT, generator=g), torch.randn(20, d, dtype=DT, generator=g)
    return X, torch.randn(n, dtype=DT, generator=g), Xv, torch.randn(20, dtype=DT, generator=g)


def ridge_saved_bytes(iters: int, method: str) -> tuple[int, torch.Tensor]:
    X, y, Xv, yv = ridge_data()
    lam = torch.tensor(0.5, dtype=DT, requires_grad=True)
    with SavedBytes() as counter:
        if method == "implicit":
            with torch.no_grad():
                w_star = ridge_gradient_descent(X, y, lam, iters)
            w = implicit_argmin(ridge_objective, w_star, X, y, lam)
        else:
            w = ridge_gradient_descent(X, y, lam, iters)
        loss = ridge_validation_loss(w, Xv, yv)
    (grad,) = torch.autograd.grad(loss, lam)
    return counter.bytes, grad


def test_ridge_implicit_memory_is_flat_and_unrolled_grows_linearly():
    implicit = {k: ridge_saved_bytes(k, "implicit") for k in (10, 1000)}
    assert implicit[10][0] == implicit[1000][0] > 0
    X, y, Xv, yv = ridge_data()
    _, grad_ref = ridge_hypergradient_closed_form(X, y, Xv, yv, torch.tensor(0.5, dtype=DT))
    torch.testing.assert_close(implicit[1000][1], grad_ref, rtol=1e-8, atol=0)  # and the gradient is right

    unrolled = {k: ridge_saved_bytes(k, "unrolled")[0] for k in (10, 100, 1000)}
    per_iteration = (unrolled[100] - unrolled[10]) / 90
    assert per_iteration > 0
    assert unrolled[1000] - unrolled[100] == pytest.approx(900 * per_iteration, rel=0, abs=0)  # exactly linear
    assert unrolled[1000] > 50 * implicit[1000][0]


def test_fixed_point_memory_is_flat_in_iterations():
    g = torch.Generator().manual_seed(1)
    W = (torch.randn(8, 8, dtype=DT, generator=g) / 4).requires_grad_()
    b = torch.randn(5, 8, dtype=DT, generator=g).requires_grad_()
    T = lambda x, W, b: torch.tanh(x @ W.T + b)

    def run(iters, implicit):
        with SavedBytes() as counter:
            x = torch.zeros_like(b)
            with torch.set_grad_enabled(not implicit):
                for _ in range(iters):
                    x = T(x, W, b)
            if implicit:
                x = implicit_fixed_point(T, x, W, b, batch_dims=1)
            loss = x.pow(2).sum()
        return counter.bytes, torch.autograd.grad(loss, (W, b))

    flat_10, _ = run(10, True)
    flat_1000, grads_implicit = run(1000, True)
    grow_10, _ = run(10, False)
    grow_1000, grads_unrolled = run(1000, False)
    assert flat_10 == flat_1000
    assert grow_1000 > 50 * grow_10  # ~100x the bytes for 100x the iterations
    for gi, gu in zip(grads_implicit, grads_unrolled):  # both converge to the same true gradient
        torch.testing.assert_close(gi, gu, rtol=1e-8, atol=1e-10)


def test_implicit_node_saves_exactly_x_star_and_params():
    theta = torch.randn(4, 3, dtype=DT, requires_grad=True)
    weight = torch.randn(3, 3, dtype=DT, requires_grad=True)
    frozen = torch.randn(3, dtype=DT)
    F = lambda x, theta, weight, frozen: x @ weight - theta - frozen
    x_star = torch.zeros(4, 3, dtype=DT)
    with SavedBytes() as counter:
        implicit_root(F, x_star, theta, weight, frozen, batch_dims=1)
    assert counter.bytes == 8 * (x_star.numel() + theta.numel() + weight.numel() + frozen.numel())
