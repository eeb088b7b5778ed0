"""Scale invariance: row and column scaling of the QP change neither z nor any gradient."""

import pytest
import torch

from ift.optnet import QPStatus, solve_qp_with_info
from ift.optnet.scaling import Scaling

from .test_qp import random_qp


def _solve_scaled(qp, W, col, row_g, row_a):
    """z and gradients w.r.t. the original data of the problem with z = C z', rows scaled."""
    args = [t.detach().clone().requires_grad_() for t in qp]
    Q, q, G, h, A, b = args
    C = col.unsqueeze(-1) * col.unsqueeze(-2)
    sol = solve_qp_with_info(Q * C, q * col, G * row_g.unsqueeze(-1) * col.unsqueeze(-2), h * row_g,
                             A * row_a.unsqueeze(-1) * col.unsqueeze(-2), b * row_a)
    z = sol.z * col
    (z * W).sum().backward()
    return sol, z.detach(), [t.grad for t in args]


@pytest.mark.parametrize("p", [0, 50])
def test_n100_solution_and_gradients_are_invariant_to_row_and_column_scaling(p):
    batch, n = 16, 100
    qp = random_qp(batch, n, n, p, seed=500 + p)
    g = torch.Generator().manual_seed(6)
    W = torch.randn(batch, n, dtype=torch.float64, generator=g)
    scale = lambda *shape: 10.0 ** (6 * torch.rand(*shape, generator=g, dtype=torch.float64) - 3)  # noqa: E731
    ones = [torch.ones(batch, k, dtype=torch.float64) for k in (n, n, p)]
    ref, z_ref, g_ref = _solve_scaled(qp, W, *ones)
    sol, z, grads = _solve_scaled(qp, W, scale(batch, n), scale(batch, n), scale(batch, p))
    assert (ref.status == QPStatus.CONVERGED).all() and (sol.status == QPStatus.CONVERGED).all()
    torch.testing.assert_close(z, z_ref, atol=1e-8 * float(z_ref.abs().max()), rtol=0)
    for name, gr, gs in zip("Q q G h A b".split(), g_ref, grads):
        if gr.numel():
            torch.testing.assert_close(gs, gr, atol=1e-8 * float(gr.abs().max()), rtol=0, msg=name)


def test_scaled_problem_is_exact_and_equilibrated():
    # Powers of two: the scaled data unscale to the input bit for bit; diag(Q~) in [1/2, 2), row
    # inf-norms of G~ in [1/sqrt 2, sqrt 2]
    Q, q, G, h, A, b = random_qp(4, 20, 30, 5, seed=9)
    G = G * 10.0 ** torch.linspace(-3, 3, 30, dtype=torch.float64).unsqueeze(-1)
    sc = Scaling(Q, G, A)
    Qs, qs, Gs, hs, As, bs = sc.problem(Q, q, G, h, A, b)
    assert torch.equal(Qs / (sc.d.unsqueeze(-1) * sc.d.unsqueeze(-2)), Q)
    assert torch.equal(hs / sc.eG, h)
    diag = Qs.diagonal(dim1=-2, dim2=-1)
    assert (diag >= 0.5).all() and (diag < 2).all()
    norms = Gs.abs().amax(-1)
    assert (norms >= 2**-0.5 - 1e-12).all() and (norms <= 2**0.5 + 1e-12).all()


def test_weakly_active_constraint_is_reported_degenerate():
    # z_0 >= 0 with q_0 = 0: slack and multiplier both 0, the gradient is one-sided
    q = torch.tensor([[0.0, -1.0, 2.0], [0.5, -1.0, 2.0]], dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    sol = solve_qp_with_info(eye, q, -eye, torch.zeros(3, dtype=torch.float64))
    assert sol.status.tolist() == [QPStatus.DEGENERATE, QPStatus.CONVERGED]
    assert sol.converged.all()
