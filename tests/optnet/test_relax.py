"""relax=rho: infeasible examples get the l2-penalised elastic relaxation, feasible ones are kept."""

import pytest
import torch

from ift.optnet import QPInfeasibleError, QPStatus, solve_qp, solve_qp_with_info

from .test_qp import random_qp


def _mixed_batch(seed=700):
    # 6 feasible problems and 2 with a contradictory pair of rows (G_0 z <= -1, -G_0 z <= -1)
    Q, q, G, h, A, b = random_qp(8, 20, 20, 3, seed=seed)
    G, h = G.clone(), h.clone()
    for i in (2, 5):
        G[i, 1], h[i, 0], h[i, 1] = -G[i, 0], -1.0, -1.0
    return Q, q, G, h, A, b


def test_feasible_examples_are_unchanged_and_infeasible_ones_relaxed():
    data = _mixed_batch()
    with pytest.raises(QPInfeasibleError):
        solve_qp(*data)
    sol = solve_qp_with_info(*data, relax=1e3)
    assert sol.status.tolist() == [0, 0, 6, 0, 0, 6, 0, 0]
    plain = solve_qp_with_info(*data)
    keep = [0, 1, 3, 4, 6, 7]
    torch.testing.assert_close(sol.z[keep], plain.z[keep], atol=0, rtol=0)
    assert (sol.slack[[2, 5]].min(-1).values < 0).all()  # the violated row shows up in the slack


def test_relaxation_is_the_penalised_problem_and_its_gradients():
    # Reference: the penalised problem written out, min f + rho/2 |max(Gz - h, 0)|^2 + rho/2 |Az - b|^2,
    # minimised by Newton's method on its piecewise quadratic (exact once the pieces settle).
    Q, q, G, h, A, b = (t[2] for t in _mixed_batch())
    rho = 1e3
    args = [t.detach().clone().requires_grad_() for t in (Q, q, G, h, A, b)]
    z = solve_qp_with_info(*args, relax=rho).z
    W = torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    (z * W).sum().backward()

    def penalised(Q, q, G, h, A, b, z):
        v = (G @ z - h).clamp_min(0)
        return 0.5 * z @ Q @ z + q @ z + 0.5 * rho * (v @ v + (A @ z - b) @ (A @ z - b))

    x = z.detach().clone()
    for _ in range(30):
        g, H = torch.func.grad(penalised, 6)(Q, q, G, h, A, b, x), torch.func.hessian(penalised, 6)(Q, q, G, h, A, b, x)
        x = x - torch.linalg.solve(H, g)
    torch.testing.assert_close(z.detach(), x, atol=1e-9, rtol=0)
    # implicit gradient of the penalised minimiser: dz = -H^-1 d(grad)/d(theta)
    H = torch.func.hessian(penalised, 6)(Q, q, G, h, A, b, x)
    u = torch.linalg.solve(H, W)
    for i, t in enumerate(args):
        cross = torch.func.jacrev(lambda th: torch.func.grad(penalised, 6)(
            *[th if j == i else a.detach() for j, a in enumerate(args)], x), 0)(t.detach())
        expect = -torch.tensordot(u, cross, dims=1)
        torch.testing.assert_close(t.grad, expect, atol=1e-6 * float(expect.abs().max() + 1), rtol=0, msg=f"arg {i}")
