"""Two-sided constraints lower <= G z <= h, solved natively, against the exact reference."""

import numpy as np
import pytest
import torch

from ift.optnet import QPStatus, solve_qp, solve_qp_with_info

from .test_qp import random_qp
from .test_qp_exact import exact_reference


def two_sided_qp(batch, n, m, p, seed, infinite=True):
    """Random QP with l <= G z <= u around a feasible z0; with `infinite`, a third of the rows
    lose their lower bound, a third their upper one, and a few rows are equalities (l = u)."""
    Q, q, G, h, A, b = random_qp(batch, n, m, p, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    Gz0 = h - torch.rand(batch, m, generator=g, dtype=torch.float64)  # h = G z0 + s0 in random_qp
    width = 0.2 + torch.rand(batch, m, generator=g, dtype=torch.float64)
    upper = Gz0 + 0.5 * width * torch.rand(batch, m, generator=g, dtype=torch.float64)
    lower = upper - width
    if infinite:
        kind = torch.randint(0, 3, (batch, m), generator=g)
        upper = torch.where(kind == 1, float("inf"), upper)
        lower = torch.where(kind == 2, -float("inf"), lower)
        eq = torch.rand(batch, m, generator=g) < 0.05
        lower, upper = torch.where(eq, Gz0, lower), torch.where(eq, Gz0, upper)
    return Q, q, G, upper, A, b, lower


NAMES = ("Q", "q", "G", "h", "A", "b", "lower")


def _solve(data, W, **kw):
    args = [t.detach().clone().requires_grad_() for t in data]
    Q, q, G, h, A, b, lower = args
    sol = solve_qp_with_info(Q, q, G, h, A, b, lower=lower, **kw)
    (sol.z * W).sum().backward()
    return sol, {k: t.grad for k, t in zip(NAMES, args)}


@pytest.mark.parametrize("p", [0, 30])
def test_n100_two_sided_solution_and_gradients_are_exact(p):
    batch, n, m = 8, 100, 100
    data = two_sided_qp(batch, n, m, p, seed=600 + p)
    W = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    sol, grads = _solve(data, W)
    assert (sol.status == QPStatus.CONVERGED).all(), sol.status
    for i in range(batch):
        Q, q, G, u, A, b, lo = (t[i].numpy() for t in data)
        up_act = (sol.lam[i] > 0).numpy() & np.isfinite(u)
        lo_act = (sol.lam[i] < 0).numpy() & np.isfinite(lo)
        eq_rows = lo == u
        up_act |= eq_rows & ~lo_act
        # The same problem with each side as its own row: [G; -G] z <= [u; -l] (finite sides).
        Gs, hs = np.vstack([G, -G]), np.concatenate([np.where(np.isfinite(u), u, 1e300),
                                                      np.where(np.isfinite(lo), -lo, 1e300)])
        active = np.concatenate([up_act, lo_act])
        z, lam, nu, margin, ref = exact_reference(Q, q, Gs, hs, A, b, active, W[i].numpy())
        eq_margin = np.concatenate([~eq_rows, ~eq_rows])  # an equality row's multiplier may take either sign
        lam_act = lam[active & eq_margin]
        slack = (hs - Gs @ z)[~active & eq_margin]
        assert min(lam_act.min(initial=np.inf), slack.min(initial=np.inf)) > 1e-6, f"problem {i}: degenerate"
        np.testing.assert_allclose(sol.z[i].detach().numpy(), z, atol=1e-9, rtol=0)
        np.testing.assert_allclose(sol.lam[i].numpy(), lam[:m] - lam[m:], atol=1e-9, rtol=0)
        expect = {"Q": ref["Q"], "q": ref["q"], "G": ref["G"][:m] - ref["G"][m:], "h": ref["h"][:m],
                  "lower": -ref["h"][m:], "A": ref["A"], "b": ref["b"]}
        scale = max(np.abs(g).max() for g in expect.values() if g.size)
        for name, g in expect.items():
            np.testing.assert_allclose(grads[name][i].numpy(), g, atol=1e-8 * scale, rtol=0, err_msg=name)


def test_one_sided_lower_bounds_match_negated_rows():
    # l <= G z alone is -G z <= -l: same z, gradients related by the sign
    Q, q, G, h, A, b = random_qp(8, 40, 40, 0, seed=610)
    W = torch.randn(8, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    inf = torch.full_like(h, float("inf"))
    sol, grads = _solve((Q, q, -G, inf, A, b, -h), W)
    ref = solve_qp_with_info(Q, q, G, h)
    torch.testing.assert_close(sol.z, ref.z, atol=1e-10, rtol=0)
    torch.testing.assert_close(sol.lam, -ref.lam, atol=1e-10, rtol=0)
    assert torch.isinf(sol.slack).all()
    torch.testing.assert_close(sol.slack_lower, ref.slack, atol=1e-10, rtol=0)
    assert (grads["h"] == 0).all()


def test_two_sided_gradcheck():
    Q, q, G, h, A, b, lower = two_sided_qp(2, 5, 6, 1, seed=620, infinite=False)
    Q = Q[0]  # shared Q: its gradient is a batch sum

    def f(Q, q, G, h, A, b, lower):
        return solve_qp(Q, q, G, h, A, b, lower=lower, precision="float64", tol=1e-12)

    args = [t.detach().clone().requires_grad_() for t in (Q, q, G, h, A, b, lower)]
    sol = solve_qp_with_info(*args[:6], lower=args[6])
    assert ((sol.lam > 1e-4) | (sol.lam < -1e-4) | (sol.lam == 0)).all()
    assert (sol.lam != 0).any(), "the check needs active rows"
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("lower, upper, message", [
    ([0.0, float("nan")], [1.0, 1.0], "NaN"),
    ([0.0, 2.0], [1.0, 1.0], "empty interval"),
    ([-float("inf"), 0.0], [float("inf"), 1.0], "constrains nothing"),
    ([float("inf"), 0.0], [float("inf"), 1.0], "lower = \\+inf"),
])
def test_bad_bounds_get_one_clear_error(lower, upper, message):
    eye = torch.eye(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        solve_qp(eye, torch.ones(2, dtype=torch.float64), eye, torch.tensor(upper, dtype=torch.float64),
                 lower=torch.tensor(lower, dtype=torch.float64))
