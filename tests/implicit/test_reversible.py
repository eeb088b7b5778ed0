"""reversible_sgd: exact reversal of SGD with momentum in fixed point, and its gradient against
unrolled differentiation of the same loop (minimize, create_graph=True), a hand-written loop and
finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from ift.implicit import minimize
from ift.implicit.minimize import MinimizeDivergenceWarning
from ift.implicit.reversible import (
    InformationBuffer,
    ReversalError,
    buffer_bits_per_step,
    decay,
    momentum_fraction,
    reversible_sgd,
    to_fixed,
    undecay,
)

B, N = 12, 6


def problem(seed: int = 0, dtype=torch.float64):
    """Per-example convex quadratics plus a shared nonlinear term: f_b(x) = x'A_b x/2 - b_b'x +
    0.1 ||tanh(x W)||^2 (W shared, b per example, both differentiated)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, N, N, generator=gen, dtype=dtype)
    a = a @ a.transpose(1, 2) / N + 0.5 * torch.eye(N, dtype=dtype)
    b = torch.randn(B, N, generator=gen, dtype=dtype).requires_grad_(True)
    w = torch.randn(N, N, generator=gen, dtype=dtype).requires_grad_(True)
    x0 = torch.randn(B, N, generator=gen, dtype=dtype).requires_grad_(True)

    def f(x, b_, w_):
        return 0.5 * torch.einsum("bi,bij,bj->b", x, a, x) - (x * b_).sum(-1) + 0.1 * torch.tanh(x @ w_).pow(2).sum(-1)

    return f, x0, b, w


def loss(x):  # a nonlinear outer loss, so the incoming gradient differs per row
    return x.pow(3).sum() + x.sum()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("momentum", [0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("lr", [0.3, 1.5])  # 1.5: many steps undone by backtracking
def test_gradient_equals_unrolled_minimize(momentum, lr):
    f, x0, b, w = problem()
    steps = 40
    rev = reversible_sgd(f, x0, b, w, steps=steps, lr=lr, momentum=momentum, clip=3.0)
    unr = minimize(f, x0, method="sgd", max_iter=steps, tol=0, lr=lr, momentum=momentum, clip=3.0,
                   create_graph=True, args=(b, w))
    assert torch.equal(rev.iterations, unr.iterations)
    if lr == 1.5:
        assert (unr.iterations < steps).any()
    assert (rev.x - unr.x).abs().max() < 1e-9
    for g_rev, g_unr in zip(torch.autograd.grad(loss(rev.x), [x0, b, w]), torch.autograd.grad(loss(unr.x), [x0, b, w])):
        assert rel(g_rev, g_unr) < 1e-8


@pytest.mark.parametrize("momentum", [0.5, 0.9, 0.75])
def test_reversal_recovers_x0_bit_for_bit_with_per_example_steps(momentum):
    f, x0, b, w = problem(1)
    steps = torch.arange(B) * 7  # 0, 7, ..., 77 steps
    result = reversible_sgd(f, x0, b, w, steps=steps, lr=1.5, momentum=momentum, clip=3.0)
    assert torch.equal(result.reverse(), to_fixed(x0))
    moved = (result.x - x0).abs().amax(-1)
    assert moved[0] <= 2.0**-40 and (moved[1:] > 1e-3).all()  # 0 steps: x0 (on the grid); else moved
    torch.autograd.grad(loss(result.x), [x0, b, w])  # the backward's own reversal check passes too


def test_per_example_steps_gradient_equals_separate_unrolled_runs():
    f, x0, b, w = problem(2)
    steps = torch.tensor([0, 1, 5, 9, 13, 17, 20, 25, 3, 8, 30, 2])
    rev = reversible_sgd(f, x0, b, w, steps=steps, lr=1.2, momentum=0.9, clip=3.0)
    g_rev = torch.autograd.grad(loss(rev.x), [x0, b, w])
    g_ref = [torch.zeros_like(t) for t in (x0, b, w)]
    for i in range(B):  # example i alone, unrolled for its own number of steps
        unr = minimize(lambda x, b_, w_, i=i: _row(f, i, x, b_, w_), x0[i:i + 1], method="sgd", max_iter=int(steps[i]), tol=0, lr=1.2, momentum=0.9,
                       clip=3.0, create_graph=True, args=(b, w))
        for acc, g in zip(g_ref, torch.autograd.grad(loss(unr.x), [x0, b, w], allow_unused=True)):
            acc += g if g is not None else 0
    for a, c in zip(g_rev, g_ref):
        assert rel(a, c) < 1e-8


def _row(f, i, x, b, w):
    """Example i's objective at x (1, n): the batch objective with x in row i."""
    full = torch.zeros(B, N, dtype=x.dtype).index_put((torch.tensor([i]),), x)
    return f(full, b, w)[i:i + 1]


def test_plain_maclaurin_loop_equals_a_hand_written_unrolled_loop():
    f, x0, b, w = problem(3)
    steps, lr, mu, clip = 30, 0.3, 0.9, 2.0
    rev = reversible_sgd(f, x0, b, w, steps=steps, lr=lr, momentum=mu, clip=clip, backtrack=False)
    x, m = x0, torch.zeros_like(x0)
    for _ in range(steps):
        (g,) = torch.autograd.grad(f(x, b, w).sum(), x, create_graph=True)
        g = g * (clip / g.detach().norm(dim=-1)).clamp(max=1.0).unsqueeze(-1)
        m = mu * m + g
        x = x - lr * m
    assert (rev.x - x).abs().max() < 1e-9
    for a, c in zip(torch.autograd.grad(loss(rev.x), [x0, b, w]), torch.autograd.grad(loss(x), [x0, b, w])):
        assert rel(a, c) < 1e-8


def test_gradcheck_against_finite_differences():
    f, x0, b, w = problem(4)
    x0, b, w = x0[:2].detach().requires_grad_(), b.detach().requires_grad_(), w.detach().requires_grad_()

    def run(x0_, w_):
        return reversible_sgd(lambda x, w2: f(torch.cat([x, torch.zeros(B - 2, N, dtype=x.dtype)]), b, w2)[:2],
                              x0_, w_, steps=8, lr=0.2, momentum=0.9, frac_bits=48, backtrack=False).x

    assert torch.autograd.gradcheck(run, (x0, w), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_decay_is_exactly_invertible_and_the_buffer_costs_log2_q_over_p():
    gen = torch.Generator().manual_seed(0)
    shape, steps = (64, 16), 400
    mask = torch.ones(shape[0], dtype=torch.bool)
    for p, q in [(1, 2), (9, 10), (99, 100), (3, 4)]:
        buf = InformationBuffer(torch.Size(shape), (p, q), steps, torch.device("cpu"))
        m0 = torch.randint(-2**50, 2**50, shape, generator=gen)
        kicks = torch.randint(-2**30, 2**30, (steps, *shape), generator=gen)
        m = m0
        for k in range(steps):
            decayed = decay(m, buf, p, q, mask)
            assert ((decayed.double() - m.double() * p / q).abs() <= p).all()  # m p/q, up to the digit drawn from the buffer
            m = decayed + kicks[k]
        held = float((buf.head.double().log2() + 32 * buf.count.double() - math.log2(buf.low)).mean())
        assert abs(held - steps * math.log2(q / p)) < 2, (p, q, held)  # bits per coordinate
        assert int(buf.count.max()) < buf.words.shape[0]
        for k in reversed(range(steps)):
            m = undecay(m - kicks[k], buf, p, q, mask)
        assert torch.equal(m, m0) and buf.at_start()


def test_bits_per_step_formula():
    assert buffer_bits_per_step(0.5, 16) == 17
    assert buffer_bits_per_step(0.5, 16, backtrack=False) == 16
    assert abs(buffer_bits_per_step(0.9, 16, backtrack=False) - 16 * math.log2(10 / 9)) < 1e-12
    assert momentum_fraction(0.9) == (9, 10) and momentum_fraction(0.5) == (1, 2)


def test_diverged_examples_fall_back_to_x0_and_reversal_stays_exact():
    f, x0, b, w = problem(5)

    def g(x, b_, w_):  # NaN once example 0 or 1 leaves the box |x| < 0.5 (a log barrier)
        barrier = torch.where(torch.arange(B) < 2, torch.log(0.5 - x.abs().amax(-1)), torch.zeros(B, dtype=x.dtype))
        return f(x, b_, w_) + barrier

    x0 = (x0 * 0.1).detach().requires_grad_(True)
    with pytest.warns(MinimizeDivergenceWarning, match="2/12 problems diverged"):
        rev = reversible_sgd(g, x0, b, w, steps=30, lr=0.5, momentum=0.9)
    assert rev.diverged[:2].all() and not rev.diverged[2:].any()
    assert torch.equal(rev.x[:2], x0[:2])
    assert torch.equal(rev.reverse(), to_fixed(x0))
    (gx0,) = torch.autograd.grad(rev.x.sum(), [x0])
    assert torch.equal(gx0[:2], torch.ones(2, N, dtype=x0.dtype))


def test_a_non_deterministic_gradient_is_caught():
    f, x0, b, w = problem(6)
    calls = {"n": 0}

    def noisy(x, b_, w_):
        calls["n"] += 1
        return f(x, b_, w_) + (1e-9 * calls["n"]) * x.sum(-1)  # a different function each call

    rev = reversible_sgd(noisy, x0, b, w, steps=20, lr=0.3, momentum=0.5)
    with pytest.raises(ReversalError, match="not reproduced bit for bit"):
        torch.autograd.grad(rev.x.sum(), [x0])


@pytest.mark.parametrize("kwargs,message", [
    ({"momentum": 0.0}, "momentum must be in \\(0, 1\\]"),
    ({"momentum": 1.5}, "momentum must be in \\(0, 1\\]"),
    ({"momentum": 0.123456789}, "not a fraction p/q"),
    ({"steps": -1}, "steps must be >= 0"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"frac_bits": 60}, "frac_bits"),
])
def test_bad_settings_are_one_line(kwargs, message):
    f, x0, b, w = problem()
    with pytest.raises(ValueError, match=message):
        reversible_sgd(f, x0, b, w, **{"steps": 5, **kwargs})
