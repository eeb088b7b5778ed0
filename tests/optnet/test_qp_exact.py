"""solve_qp at realistic size (n = 100) against an exact active-set reference, and against qpth.

The reference is written here with numpy: given an active set, it solves the equality-
constrained KKT system [Q C^T; C 0] (C = [A; G_act]) directly, and certifies the result: if the
kept multipliers are > 0 and the dropped constraints hold with slack > 0 (margins checked), the
point satisfies the KKT conditions, so it is the unique optimum whatever proposed the active set,
and on a nondegenerate problem the same system gives the exact derivatives.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from ift.optnet import QPStatus, solve_qp_with_info

from .test_qp import random_qp

NAMES = ("Q", "q", "G", "h", "A", "b")


def exact_reference(Q, q, G, h, A, b, active, W):
    """z, lam, nu, the nondegeneracy margin and the gradients of sum(W * z) w.r.t. all six args."""
    n, m, p = q.shape[0], h.shape[0], b.shape[0]
    C = np.vstack([A, G[active]])
    k = C.shape[0]
    K = np.block([[Q, C.T], [C, np.zeros((k, k))]])
    sol = np.linalg.solve(K, np.concatenate([-q, b, h[active]]))
    z, nu, lam_act = sol[:n], sol[n : n + p], sol[n + p :]
    lam = np.zeros(m)
    lam[active] = lam_act
    slack = h - G @ z
    margin = min(lam_act.min(initial=np.inf), slack[~active].min(initial=np.inf))
    # d(W.z) = (u, v) . (-(dQ z + dq + dC^T y), dd - dC z) with K (u, v) = (W, 0), K symmetric.
    adj = np.linalg.solve(K, np.concatenate([W, np.zeros(k)]))
    u, v_eq, v_act = adj[:n], adj[n : n + p], adj[n + p :]
    v = np.zeros(m)
    v[active] = v_act
    grads = {
        "Q": -0.5 * (np.outer(u, z) + np.outer(z, u)),
        "q": -u,
        "G": -(np.outer(lam, u) + np.outer(v, z)),
        "h": v,
        "A": -(np.outer(nu, u) + np.outer(v_eq, z)),
        "b": v_eq,
    }
    return z, lam, nu, margin, grads


def solve_with_grads(qp, W):
    args = [t.detach().clone().requires_grad_() for t in qp]
    sol = solve_qp_with_info(*args)
    (sol.z * W).sum().backward()
    return sol, {k: t.grad for k, t in zip(NAMES, args)}


@pytest.mark.parametrize("p", [0, 50])
def test_n100_solution_duals_and_gradients_are_exact(p):
    batch, n = 16, 100
    qp = random_qp(batch, n, n, p, seed=100 + p)
    W = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sol, grads = solve_with_grads(qp, W)
    assert (sol.status == QPStatus.CONVERGED).all()
    for i in range(batch):
        data = [t[i].numpy() for t in qp]
        active = (sol.lam[i] > sol.slack[i]).numpy()
        z, lam, nu, margin, ref = exact_reference(*data, active, W[i].numpy())
        assert margin > 1e-6, f"problem {i} is degenerate or the active set is wrong (margin {margin:.1e})"
        np.testing.assert_allclose(sol.z[i].detach().numpy(), z, atol=1e-9, rtol=0)
        np.testing.assert_allclose(sol.lam[i].numpy(), lam, atol=1e-9, rtol=0)
        np.testing.assert_allclose(sol.nu[i].numpy(), nu, atol=1e-9, rtol=0)
        scale = max(np.abs(g).max() for g in ref.values() if g.size)
        for name in NAMES:
            np.testing.assert_allclose(
                grads[name][i].numpy(), ref[name], atol=1e-8 * scale, rtol=0, err_msg=f"d/d{name}, problem {i}"
            )


@pytest.mark.parametrize("p", [0, 10])
def test_matches_qpth(p):
    """Opt-in reference: `pip install -e '.[bench]'` installs qpth 0.0.18."""
    pytest.importorskip("qpth", reason="qpth not installed: pip install -e '.[bench]' (qpth==0.0.18)")
    from qpth.qp import QPFunction

    batch, n = 8, 20
    qp = random_qp(batch, n, n, p, seed=200 + p)
    W = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sol, grads = solve_with_grads(qp, W)
    args = [t.detach().clone().requires_grad_() for t in qp]
    empty = torch.empty(0, dtype=torch.float64)
    z_qpth = QPFunction(verbose=-1, eps=1e-12)(*args[:4], *(args[4:] if p else (empty, empty)))
    (z_qpth * W).sum().backward()
    np.testing.assert_allclose(sol.z.detach().numpy(), z_qpth.detach().numpy(), atol=1e-6, rtol=0)
    scale = max(g.abs().max().item() for g in grads.values() if g.numel())
    for name, t in zip(NAMES, args):
        if t.grad is not None:  # qpth gives no gradient for its empty A, b
            np.testing.assert_allclose(grads[name].numpy(), t.grad.numpy(), atol=1e-3 * scale, rtol=0, err_msg=name)


def test_duplicated_constraints_give_the_same_solution_and_finite_gradients():
    # Every active constraint twice: the multipliers are not unique (no LICQ), z and dz/dq are.
    qp = random_qp(8, 100, 100, 0, seed=300)
    Q, q, G, h = (t.clone() for t in qp[:4])
    q1, q2 = q.clone().requires_grad_(), q.clone().requires_grad_()
    W = torch.randn(8, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    z1 = solve_qp_with_info(Q, q1, G, h).z
    z2 = solve_qp_with_info(Q, q2, torch.cat([G, G], 1), torch.cat([h, h], 1)).z
    torch.testing.assert_close(z2, z1, atol=1e-9, rtol=0)
    (z1 * W).sum().backward()
    (z2 * W).sum().backward()
    torch.testing.assert_close(q2.grad, q1.grad, atol=1e-7, rtol=0)


def test_weakly_active_constraint_gets_a_one_sided_gradient():
    # min 1/2 |z|^2 + q^T z s.t. z >= 0 with q_0 = 0: z_0 = 0 with lam_0 = 0 (weakly active).
    # dz_0/dq_0 is -1 from one side and 0 from the other; the backward returns one of the two.
    q = torch.tensor([[0.0, -1.0, 2.0]] * 4, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(3, dtype=torch.float64)
    sol = solve_qp_with_info(eye, q, -eye, torch.zeros(3, dtype=torch.float64))
    sol.z.sum().backward()
    assert torch.isfinite(q.grad).all()
    assert set(q.grad[:, 0].tolist()) <= {0.0, -1.0}
    torch.testing.assert_close(q.grad[:, 1:], torch.tensor([[-1.0, 0.0]] * 4, dtype=torch.float64))


def test_n100_float32_inputs_are_float64_results_rounded():
    # The default (mixed) policy iterates in float32 but polishes, verifies and differentiates in
    # float64: z and the gradients of the float32 problem agree with the exact reference to
    # float32 rounding of the outputs.
    batch, n = 16, 100
    qp = [t.float() for t in random_qp(batch, n, n, 50, seed=150)]
    W = torch.randn(batch, n, generator=torch.Generator().manual_seed(4))
    sol, grads = solve_with_grads(qp, W)
    assert sol.z.dtype == torch.float32 and (sol.status == QPStatus.CONVERGED).all()
    for i in range(batch):
        data = [t[i].double().numpy() for t in qp]
        z, _, _, margin, ref = exact_reference(*data, (sol.lam[i] > sol.slack[i]).numpy(), W[i].double().numpy())
        assert margin > 1e-6
        np.testing.assert_allclose(sol.z[i].detach().double().numpy(), z, atol=1e-5, rtol=0)
        scale = max(np.abs(g).max() for g in ref.values() if g.size)
        for name in NAMES:
            np.testing.assert_allclose(grads[name][i].double().numpy(), ref[name], atol=1e-5 * scale, rtol=0)


# --- dtype policy (precision="mixed": float32 interior point, float64 crossover and backward) ---


@pytest.mark.parametrize("p", [0, 50])
def test_mixed_precision_matches_float64_policy(p):
    # Same problems, same active sets: the float64-verified crossover makes the default policy's
    # solution and gradients those of the all-float64 solve, to float64 rounding.
    qp = random_qp(16, 100, 100, p, seed=400 + p)
    W = torch.randn(16, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    sol, grads = solve_with_grads(qp, W)
    args = [t.detach().clone().requires_grad_() for t in qp]
    ref = solve_qp_with_info(*args, precision="float64")
    (ref.z * W).sum().backward()
    assert (sol.status == QPStatus.CONVERGED).all() and (ref.status == QPStatus.CONVERGED).all()
    torch.testing.assert_close(sol.z, ref.z, atol=1e-11, rtol=0)
    torch.testing.assert_close(sol.lam, ref.lam, atol=1e-10, rtol=0)
    scale = max(float(t.grad.abs().max()) for t in args if t.grad.numel())
    for name, t in zip(NAMES, args):
        torch.testing.assert_close(grads[name], t.grad, atol=1e-10 * scale, rtol=0, msg=name)


def test_what_float32_cannot_finish_continues_in_float64(monkeypatch):
    # cond(Q) = 1e7 (after the solver's Jacobi scaling too: Q's eigenvectors are random): the
    # float32 factors are too coarse for the crossover's refinement, so every example carries on
    # in float64 from its float32 iterate, and converges there.
    import ift.optnet.qp as qp_module

    continued = []
    real = qp_module._continue_in_float64
    monkeypatch.setattr(qp_module, "_continue_in_float64", lambda r, rows, *a: continued.append(rows) or real(r, rows, *a))
    _, q, G, h, _, _ = random_qp(8, 60, 60, 0, seed=7)
    U, _ = torch.linalg.qr(torch.randn(8, 60, 60, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    Q = U @ torch.diag_embed(torch.logspace(0, -7, 60, dtype=torch.float64)) @ U.mT
    q = q.clone().requires_grad_()
    sol = solve_qp_with_info(Q, q, G, h)
    assert continued and (sol.status == QPStatus.CONVERGED).all()
    assert (sol.iterations <= 50).all()
    q64 = q.detach().clone().requires_grad_()
    ref = solve_qp_with_info(Q, q64, G, h, precision="float64")
    scale = float(ref.z.detach().abs().max())
    torch.testing.assert_close(sol.z, ref.z, atol=1e-11 * scale, rtol=0)
    sol.z.sum().backward()
    ref.z.sum().backward()
    torch.testing.assert_close(q.grad, q64.grad, atol=1e-8 * float(q64.grad.abs().max()), rtol=0)


def test_redundant_equalities_iterate_in_float64_from_the_start(monkeypatch):
    # Every equality twice: A Q^-1 A^T is singular, its shifted factor would amplify float32
    # rounding, so no example may take a float32 interior point step.
    import ift.optnet.qp as qp_module

    float32_steps_allowed = []
    real = qp_module._solve
    monkeypatch.setattr(qp_module, "_solve", lambda *a, **k: float32_steps_allowed.append(k.get("left")) or real(*a, **k))
    Q, q, G, h, A, b = random_qp(8, 50, 50, 10, seed=8)
    sol = solve_qp_with_info(Q, q, G, h, torch.cat([A, A], 1), torch.cat([b, b], 1))
    ref = solve_qp_with_info(Q, q, G, h, A, b, precision="float64")
    assert (float32_steps_allowed[0] == 0).all() and float32_steps_allowed[0].numel() == 8
    assert (sol.status == QPStatus.CONVERGED).all()
    torch.testing.assert_close(sol.z, ref.z, atol=1e-9, rtol=0)


def test_float32_examples_whose_polish_fails_are_still_float64_accurate():
    # A trained OptNetSudoku model (seed 0, epoch 2 of optnet_models.py; A, z0 and six test puzzles
    # in data/): float32 inputs, Q = 0.1 I, z >= 0, A z = A z0 (64 variables, 40 equalities, ~24
    # bounds active: a vertex). The first puzzles' polish guessed a 25th bound, which made the
    # active set rank-deficient, and its corrections went astray; the float64 continuation then
    # stopped at float32's tol 1e-7 and returned the interior point iterate as CONVERGED, 4.6e-4
    # off the exact z, with the gradient of the failed set (relative error 0.17 on a batch).
    # Now the continuation iterates to float64's tol, and an iterate returned as such is
    # differentiated on its own active set.
    data = torch.load(Path(__file__).parent / "data" / "sudoku_polish_failure.pt", weights_only=True)
    A, z0, x = data["A"], data["z0"], data["puzzles"]
    batch, n = x.shape
    eye = torch.eye(n)
    qp = [0.1 * eye.expand(batch, n, n), -x, -eye.expand(batch, n, n), torch.zeros(batch, n),
          A.expand(batch, *A.shape), (A @ z0).expand(batch, -1)]
    W = torch.randn(batch, n, generator=torch.Generator().manual_seed(6))
    sol, grads = solve_with_grads(qp, W)
    assert sol.converged.all()
    exact = solve_qp_with_info(*(t.double() for t in qp), precision="float64")  # the same problems
    vertex = n - A.shape[0]  # every solution here is a vertex: 24 bounds active (A has full rank 40)
    for i in range(batch):
        data = [t[i].double().numpy() for t in qp]
        score = exact.lam[i] - exact.slack[i]  # puzzle 790 has a 25th, weakly active bound: leave it out
        active = np.zeros(n, dtype=bool)
        active[torch.argsort(score, descending=True)[:vertex].numpy()] = True
        z, _, _, margin, ref = exact_reference(*data, active, W[i].double().numpy())
        assert margin > -1e-12  # kept multipliers >= 0, dropped bounds hold: this is the QP's solution
        err = np.abs(sol.z[i].detach().double().numpy() - z).max()
        if margin < 1e-6:  # degenerate (790): z is unique, the derivative one-sided; an iterate to tol
            assert err < 1e-5, (i, err)
            continue
        assert err < 1e-6, (i, err)  # float32 rounding of z ~ 6e-8
        scale = max(np.abs(g).max() for g in ref.values() if g.size)  # dL/dq = 0 at a vertex: one scale
        for name in ("q", "A", "b"):
            np.testing.assert_allclose(grads[name][i].double().numpy(), ref[name], atol=1e-4 * scale, rtol=0, err_msg=name)
