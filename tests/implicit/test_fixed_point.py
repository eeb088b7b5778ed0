"""The core's forward fixed-point iteration, against closed forms."""

import pytest
import torch

from ift.implicit import implicit_fixed_point
from ift.implicit.fixed_point import fixed_point


def contraction(batch: int, n: int, norm: float, seed: int = 0):
    """Row-wise affine maps T_b(x) = A_b x + c_b with spectral norm ||A_b|| = norm < 1."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    A = norm * M / torch.linalg.matrix_norm(M, ord=2)[:, None, None]
    c = torch.randn(batch, n, generator=g, dtype=torch.float64)
    return A, c


def affine(x, A, c):
    return (A @ x.unsqueeze(-1)).squeeze(-1) + c


def test_converges_to_the_closed_form_fixed_point_row_by_row():
    A, c = contraction(32, 50, 0.9)
    result = fixed_point(affine, torch.zeros(32, 50, dtype=torch.float64), A, c, tol=1e-12, max_iter=1000)
    exact = torch.linalg.solve(torch.eye(50, dtype=torch.float64) - A, c)
    assert bool(result.converged.all())
    assert (result.x - exact).abs().max() < 1e-9
    # Rows stop on their own: a row whose contraction is much faster takes far fewer iterations.
    A_fast, _ = contraction(1, 50, 0.1, seed=1)
    A_mixed = torch.cat([A[:1], A_fast])
    fast = fixed_point(affine, torch.zeros(2, 50, dtype=torch.float64), A_mixed, c[:2], tol=1e-12, max_iter=1000)
    assert fast.iterations[1] < fast.iterations[0] / 3 and bool(fast.converged.all())


def test_gradient_through_implicit_fixed_point_equals_the_closed_form():
    A, c = contraction(4, 20, 0.8)
    c = c.requires_grad_(True)
    x_star = fixed_point(affine, torch.zeros(4, 20, dtype=torch.float64), A, c, tol=1e-13, max_iter=2000).x
    x = implicit_fixed_point(affine, x_star, A, c, batch_dims=1, tol=1e-12)
    w = torch.randn(4, 20, dtype=torch.float64)
    (x * w).sum().backward()
    # x* = (I - A)^-1 c  =>  dL/dc = (I - A)^-T w
    expected = torch.linalg.solve((torch.eye(20, dtype=torch.float64) - A).mT, w)
    assert (c.grad - expected).abs().max() < 1e-8


def test_an_unfinished_iteration_is_reported_not_hidden():
    A, c = contraction(8, 30, 0.99)
    result = fixed_point(affine, torch.zeros(8, 30, dtype=torch.float64), A, c, tol=1e-12, max_iter=5)
    assert not bool(result.converged.any())
    assert bool((result.residual > 1e-12).all())
    assert bool((result.iterations == 5).all())


def test_nan_rows_stop_and_are_not_converged_while_the_others_finish():
    A, c = contraction(3, 10, 0.5)
    c = c.clone()
    c[1, 0] = float("nan")
    result = fixed_point(affine, torch.zeros(3, 10, dtype=torch.float64), A, c, tol=1e-10, max_iter=200)
    assert result.converged.tolist() == [True, False, True]


def test_accelerator_style_checks_give_the_same_answer():
    A, c = contraction(16, 20, 0.9)
    x0 = torch.zeros(16, 20, dtype=torch.float64)
    every = fixed_point(affine, x0, A, c, tol=1e-10, max_iter=500, check_every=1)
    sparse = fixed_point(affine, x0, A, c, tol=1e-10, max_iter=500, check_every=8)
    assert torch.equal(every.x, sparse.x) and torch.equal(every.iterations, sparse.iterations)


@pytest.mark.parametrize("kwargs, key", [({"tol": 0.0}, "tol"), ({"max_iter": 0}, "max_iter"),
                                         ({"damping": 1.5}, "damping"), ({"check_every": 0}, "check_every")])
def test_bad_settings_are_one_line_errors_naming_the_argument(kwargs, key):
    A, c = contraction(2, 3, 0.5)
    with pytest.raises(ValueError, match=f"fixed_point: {key} must be"):
        fixed_point(affine, torch.zeros(2, 3, dtype=torch.float64), A, c, **kwargs)


def test_a_map_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="shaped like x"):
        fixed_point(lambda x: x.sum(-1), torch.zeros(2, 3))

