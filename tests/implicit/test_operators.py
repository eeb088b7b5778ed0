"""hvp and power_iteration against closed forms."""

import torch

from ift.implicit import Direct, hvp, power_iteration

DT = torch.float64


def test_hvp_matches_dense_hessian():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, dtype=DT, generator=g)
    f = lambda x: 0.5 * x @ A @ x + x.pow(4).sum()
    x, v = torch.randn(5, dtype=DT, generator=g), torch.randn(5, dtype=DT, generator=g)
    H = 0.5 * (A + A.T) + torch.diag(12 * x**2)
    torch.testing.assert_close(hvp(f, x, v), H @ v)


def test_power_iteration_finds_dominant_eigenvalue_per_row():
    eig = torch.tensor([[5.0, 1.0, 0.5], [-7.0, 2.0, 1.0]], dtype=DT)
    q, _ = torch.linalg.qr(torch.randn(2, 3, 3, dtype=DT, generator=torch.Generator().manual_seed(1)))
    M = q @ torch.diag_embed(eig) @ q.transpose(1, 2)
    lam, vec = power_iteration(lambda v: (M @ v.unsqueeze(-1)).squeeze(-1), torch.ones(2, 3, dtype=DT), iters=500, tol=1e-14)
    torch.testing.assert_close(lam, torch.tensor([5.0, -7.0], dtype=DT))
    torch.testing.assert_close((M @ vec.unsqueeze(-1)).squeeze(-1), lam.unsqueeze(-1) * vec)


def test_direct_with_large_max_iter_stops_on_singular_problem():
    A = torch.diag(torch.tensor([1.0, 0.0], dtype=DT)).expand(1, 2, 2)
    calls = []

    def matvec(v):
        calls.append(1)
        return (A @ v.unsqueeze(-1)).squeeze(-1)

    _, info = Direct(max_iter=1000).solve(matvec, torch.ones(1, 2, dtype=DT))
    assert not info.all_converged and len(calls) < 20  # no endless refinement of a singular system
