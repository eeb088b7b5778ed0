"""warm_start: a previous solution's active set is verified before the first interior point step."""

import pytest
import torch

from ift.optnet import QPStatus, solve_qp_with_info

from .test_qp import random_qp


@pytest.mark.parametrize("p", [0, 20])
def test_warm_start_from_a_nearby_solution_takes_fewer_steps_and_gives_the_same_answer(p):
    Q, q, G, h, A, b = random_qp(16, 50, 50, p, seed=800 + p)
    prev = solve_qp_with_info(Q, q, G, h, A, b)
    q2 = (q + 1e-4 * torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(1))).requires_grad_()
    q3 = q2.detach().clone().requires_grad_()
    cold = solve_qp_with_info(Q, q2, G, h, A, b)
    warm = solve_qp_with_info(Q, q3, G, h, A, b, warm_start=prev)
    assert (cold.status == QPStatus.CONVERGED).all() and (warm.status == QPStatus.CONVERGED).all()
    assert (warm.iterations == 0).float().mean() > 0.5 and warm.iterations.sum() < cold.iterations.sum()
    torch.testing.assert_close(warm.z, cold.z, atol=1e-11, rtol=0)
    cold.z.sum().backward()
    warm.z.sum().backward()
    torch.testing.assert_close(q3.grad, q2.grad, atol=1e-10, rtol=0)


def test_a_wrong_warm_start_changes_nothing_but_time():
    Q, q, G, h, A, b = random_qp(8, 30, 30, 0, seed=810)
    other = solve_qp_with_info(Q, -q, G, h)  # a different active set
    cold = solve_qp_with_info(Q, q, G, h)
    warm = solve_qp_with_info(Q, q, G, h, warm_start=other)
    torch.testing.assert_close(warm.z, cold.z, atol=1e-11, rtol=0)
    assert (warm.status == QPStatus.CONVERGED).all()


def test_warm_start_of_another_shape_is_one_clear_error():
    Q, q, G, h, A, b = random_qp(4, 10, 10, 0, seed=820)
    prev = solve_qp_with_info(Q[:2], q[:2], G[:2], h[:2])
    with pytest.raises(ValueError, match="same batch of problems"):
        solve_qp_with_info(Q, q, G, h, warm_start=prev)
