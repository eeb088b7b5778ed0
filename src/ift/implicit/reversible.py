"""Reversible SGD with momentum (Maclaurin, Duvenaud & Adams 2015, Algorithms 1 and 2), batched.

``reversible_sgd(objective, x0, *params, steps=K, lr=..., momentum=...)`` minimises
``objective(x, *params) -> (B,)`` over ``x`` (B, n) with the same first-order loop as
``minimize(method="sgd")`` (momentum, per-problem gradient-norm clipping and backtracking), and
returns the result attached to ``x0`` and ``params``. Its backward does not store the trajectory:
it runs the loop *backwards*, recovering every iterate exactly from the last one, re-evaluates one
step's gradient at a time (its graph freed after use) and accumulates the vector-Jacobian products
w.r.t. ``x0`` and every ``param`` (shared weights and per-problem data alike; the objective must
take all tensors it should be differentiated w.r.t. through ``params``, not by closure).

The update (the project's SGD, with ``c_k = min(1, clip / ||g_k||)``, treated as a constant in the
derivative as in the unrolled loop):

    m_{k+1} = mu m_k + c_k grad f(x_k)           x_{k+1} = x_k - s_k m_{k+1}

Reversing it in floating point fails: ``m_k = (m_{k+1} - g_k) / mu`` multiplies every rounding
error by ``1 / mu`` per step (2^200 after 200 steps at mu = 0.5). So, as in Maclaurin et al., the
iterate and the velocity are **fixed-point integers** (int64, value = integer * 2^-frac_bits), in
which adding a gradient and taking a step are exact (the same rounded integer is subtracted
again), and the one lossy operation, the momentum decay ``m -> mu m``, is made exact with an
**information buffer** that stores the digits it destroys:

- ``mu`` is taken as a rational ``p / q`` (``Fraction.limit_denominator``; 0.5 = 1/2, 0.9 = 9/10).
- decay: push ``m mod q`` (a digit in base q) onto the buffer, ``m <- (m div q) * p + d`` where
  ``d`` is a base-p digit popped from the buffer (bits-back: the buffer's content pays for the
  low digit of the result). Undo: push ``m mod p``, ``m <- (m div p) * q + (popped base-q digit)``.
  Net, the buffer grows by log2(q / p) bits per coordinate per step: exactly what the map
  ``m -> mu m`` destroys, not the log2(q) of storing the remainder alone.
- the buffer is a stack of digits per coordinate, coded with range ANS (Duda 2013) with uniform
  digits: an int64 head in [L, 2^32 L) and a stack of 32-bit words it spills into and refills
  from. ``L`` is a multiple of p and q (<= 2^30), which makes every push and pop exact inverses.

The backward recomputes each gradient from the recovered iterate and must get the same bits the
forward got (the integer velocity is only recovered if the rounded gradient is identical). Both
passes therefore evaluate the objective on the full batch, always (stopped problems are carried
along masked, so shapes and kernels never change); row b's result must depend only on row b's
input (true for per-problem objectives built from matmuls and elementwise ops on CPU and CUDA).
The backward checks that it arrived at ``x0``'s fixed-point representation exactly and raises
:class:`ReversalError` if not (a gradient from a drifted trajectory is meaningless).

What the backward keeps, per problem (``ReversibleResult.buffer_bytes`` reports the total):

- ``n log2(q / p) / 8`` bytes per step for the momentum decay (0.5: n/8 bytes, 2 bytes for
  n = 16; 0.9: 0.019 n bytes), in 32-bit words allocated for the worst case, plus an 8-byte
  head per coordinate;
- with backtracking, 1 bit per step (was the step undone?) and ``8 n`` bytes per undone step: an
  undo resets the velocity to 0 and so destroys all of it;
- the final iterate, velocity and step size, ``x0`` and the ``params`` (inputs, kept anyway).

Fixed-point range: with ``frac_bits = 40`` (default) the resolution is 2^-40 = 9.1e-13 and
iterates, velocities and clipped gradients must stay below 2^20 (about 1e6) in absolute value;
a problem that leaves that range (or ``max_abs``) counts as diverged and falls back to ``x0``,
as in ``minimize``. Clipping keeps the gradient in range.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable

import torch
from torch.autograd.function import once_differentiable

from ift.implicit.minimize import MinimizeDivergenceWarning, MinimizeResult, _slack, relative_stationarity

WORD_BITS = 32
_WORD_MASK = (1 << WORD_BITS) - 1
MAX_DENOMINATOR = 2**15      # p, q <= 2^15: p q <= 2^30 fits the buffer's interval
_STATE_LIMIT = 2**61         # |iterate|, |velocity| < 2^61 (+ |gradient| < 2^60: no int64 overflow)
_GRAD_LIMIT = 2**60


class ReversalError(RuntimeError):
    """The reversed trajectory did not return to x0 exactly (non-deterministic objective)."""


def momentum_fraction(momentum: float) -> tuple[int, int]:
    """``momentum`` as p / q (q <= 2^15); refused unless 0 < momentum <= 1 and the fraction is exact
    to 1e-12 (the unrolled loop multiplies by the float, this one by the fraction)."""
    if not 0 < momentum <= 1:
        raise ValueError(f"reversible_sgd: momentum must be in (0, 1], got {momentum} (momentum 0 "
                         f"forgets the velocity, and a step x - s grad f(x) cannot be undone without it)")
    frac = Fraction(momentum).limit_denominator(MAX_DENOMINATOR)
    if abs(float(frac) - momentum) > 1e-12 * momentum:
        raise ValueError(f"reversible_sgd: momentum={momentum} is not a fraction p/q with q <= "
                         f"{MAX_DENOMINATOR} (closest {frac}); use e.g. 0.5, 0.9, 0.99")
    return frac.numerator, frac.denominator


def buffer_bits_per_step(momentum: float, dim: int, backtrack: bool = True) -> float:
    """Information the backward keeps per problem per step, in bits, excluding undone steps (each
    of which keeps another 64 * dim): dim * log2(q / p) for the momentum decay, + 1 with backtracking."""
    p, q = momentum_fraction(momentum)
    return dim * math.log2(q / p) + (1 if backtrack else 0)


# --- the information buffer ---------------------------------------------------------------------
class InformationBuffer:
    """One stack of digits per element: range ANS with uniform digits and 32-bit words.

    ``push(digit, base)`` / ``pop(base)`` are exact inverses for any bases dividing ``low``; the
    head stays in [low, 2^32 low) and spills its low word to the stack (refills from it) to stay
    there. Popping more than was pushed is allowed once a push came first in the same step (the
    bits-back pop of the momentum decay); the stack never underflows.
    """

    def __init__(self, shape: torch.Size, bases: tuple[int, int], steps: int, device: torch.device):
        p, q = bases
        self.low = p * q * 2 ** int(math.floor(math.log2(2**30 / (p * q))))
        self.high = self.low << WORD_BITS                     # <= 2^62
        # log2(head * 2^(32 count)) grows by <= log2(q/p) + 2^-12 per step and starts at log2(low).
        capacity = int(steps * (math.log2(q / p) + 2**-12) / WORD_BITS) + 2
        self.head = torch.full(shape, self.low, dtype=torch.int64, device=device)
        self.words = torch.zeros((capacity, *shape), dtype=torch.int32, device=device)
        self.count = torch.zeros(shape, dtype=torch.int64, device=device)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.head, self.words, self.count

    @classmethod
    def from_tensors(cls, low: int, head, words, count) -> "InformationBuffer":
        buf = cls.__new__(cls)
        buf.low, buf.high = low, low << WORD_BITS
        buf.head, buf.words, buf.count = head.clone(), words.clone(), count.clone()
        return buf

    def push(self, digit: torch.Tensor, base: int, mask: torch.Tensor) -> None:
        head = self.head
        spill = mask & (head >= self.high // base)
        # Unconditional write at the first free slot: where nothing spills, that slot stays free.
        self.words.scatter_(0, self.count.unsqueeze(0), (head & _WORD_MASK).to(torch.int32).unsqueeze(0))
        self.count = self.count + spill.long()
        head = torch.where(spill, head >> WORD_BITS, head)
        self.head = torch.where(mask, head * base + digit, self.head)

    def pop(self, base: int, mask: torch.Tensor) -> torch.Tensor:
        digit = torch.remainder(self.head, base)
        head = torch.div(self.head, base, rounding_mode="floor")
        pull = mask & (head < self.low)
        self.count = self.count - pull.long()
        word = self.words.gather(0, self.count.clamp_min(0).unsqueeze(0)).squeeze(0).long() & _WORD_MASK
        head = torch.where(pull, (head << WORD_BITS) | word, head)
        self.head = torch.where(mask, head, self.head)
        return digit

    def at_start(self) -> bool:
        return bool((self.head == self.low).all()) and bool((self.count == 0).all())


def decay(m: torch.Tensor, buf: InformationBuffer, p: int, q: int, mask: torch.Tensor) -> torch.Tensor:
    """m -> about m p / q (within p units), exactly invertible by :func:`undecay` (rows in ``mask``)."""
    if p == q:
        return m
    mask = mask.unsqueeze(-1).expand_as(m)
    buf.push(torch.remainder(m, q), q, mask)
    out = torch.div(m, q, rounding_mode="floor") * p
    if p > 1:
        out = out + buf.pop(p, mask)
    return torch.where(mask, out, m)


def undecay(m: torch.Tensor, buf: InformationBuffer, p: int, q: int, mask: torch.Tensor) -> torch.Tensor:
    if p == q:
        return m
    mask = mask.unsqueeze(-1).expand_as(m)
    if p > 1:
        buf.push(torch.remainder(m, p), p, mask)
    out = torch.div(m, p, rounding_mode="floor") * q + buf.pop(q, mask)
    return torch.where(mask, out, m)


# --- the loop -----------------------------------------------------------------------------------
@dataclass
class _Settings:
    steps: torch.Tensor          # (B,) per-problem iteration counts
    lr: float
    p: int
    q: int
    clip: float | None
    max_abs: float
    frac_bits: int
    backtrack: bool

    @property
    def scale(self) -> float:
        return 2.0**self.frac_bits

    @property
    def momentum(self) -> float:
        return self.p / self.q


def _to_fixed(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.round(x.double() * scale).long()


def _from_fixed(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return (x.double() / scale).to(dtype)


def _step(step_size: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The integer subtracted from the iterate, a deterministic function of (s, m)."""
    return torch.round(step_size.unsqueeze(-1) * m.double()).clamp(-(2.0**62), 2.0**62).long()


def _clip(grad: torch.Tensor, clip: float | None) -> torch.Tensor:
    """minimize's SGD clipping, expression for expression (the factor is a constant for autograd)."""
    g = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))
    if clip is None:
        return g
    norm = g.detach().norm(dim=-1)
    return g * (clip / norm.clamp_min(1e-12)).clamp(max=1.0).unsqueeze(-1)


def _value_and_grad(objective, x: torch.Tensor, params, create_graph: bool):
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        value = objective(xg, *params)
        if value.shape != x.shape[:1]:
            raise ValueError(f"reversible_sgd: the objective must return one value per problem, shape "
                             f"{tuple(x.shape[:1])}, got {tuple(value.shape)}")
        (grad,) = torch.autograd.grad(value.sum(), xg, create_graph=create_graph)
    return xg, value, grad


@dataclass
class _Trajectory:
    """What the forward leaves for the backward (all saved for backward)."""

    x: torch.Tensor              # (B, n) int64, the last iterate
    m: torch.Tensor              # (B, n) int64, the last velocity
    step_size: torch.Tensor      # (B,) float64
    buffer: InformationBuffer
    undone_bits: torch.Tensor    # (ceil(K/8), B) uint8: bit k % 8 of row k // 8 = step k was undone
    undone_m: torch.Tensor       # (U, n) int64: the velocities the undone steps reset, in order
    stop: torch.Tensor           # (B,) iterations executed (steps taken + undone ones)
    final_undo: torch.Tensor     # (B,) bool: the last step was undone after the loop
    diverged: torch.Tensor       # (B,) bool

    def tensors(self) -> list[torch.Tensor]:
        return [self.x, self.m, self.step_size, *self.buffer.tensors(), self.undone_bits, self.undone_m,
                self.stop, self.final_undo, self.diverged]

    @classmethod
    def from_tensors(cls, low: int, tensors) -> "_Trajectory":
        x, m, s, head, words, count, bits, undone_m, stop, final_undo, diverged = tensors
        return cls(x.clone(), m.clone(), s.clone(), InformationBuffer.from_tensors(low, head, words, count),
                   bits, undone_m, stop, final_undo, diverged)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


@dataclass
class _ForwardState:
    """`_run_forward`'s loop state: fixed-point x and velocity m; per row the step size, the last
    accepted value and gradient, the step it stopped after, the undone steps and divergence; the
    velocities of the undone steps (for their reversal)."""

    x: torch.Tensor
    m: torch.Tensor
    step_size: torch.Tensor
    prev_value: torch.Tensor
    prev_grad: torch.Tensor
    stop: torch.Tensor
    undone: torch.Tensor
    diverged: torch.Tensor
    undone_m: list[torch.Tensor]


def _run_forward(objective, x0: torch.Tensor, params, st: _Settings):
    """Algorithm 1 in fixed point. Returns the trajectory, the returned point and its report."""
    scale, dtype = st.scale, x0.dtype
    batch, device = x0.shape[0], x0.device
    n_steps = int(st.steps.max()) if batch else 0
    x = _to_fixed(x0, scale)
    long_zeros = torch.zeros(batch, dtype=torch.long, device=device)
    fs = _ForwardState(
        x=x, m=torch.zeros_like(x), step_size=torch.full((batch,), st.lr, dtype=torch.float64, device=device),
        prev_value=torch.full((batch,), math.inf, dtype=dtype, device=device), prev_grad=torch.zeros_like(x0),
        stop=long_zeros, undone=long_zeros.clone(), diverged=torch.zeros(batch, dtype=torch.bool, device=device),
        undone_m=[])
    buf = InformationBuffer(x.shape, (st.p, st.q), n_steps, device)
    bits = torch.zeros((max(1, math.ceil(n_steps / 8)), batch), dtype=torch.uint8, device=device)
    bound = min(st.max_abs * scale, float(_STATE_LIMIT))
    for k in range(n_steps):
        live = ~fs.diverged & (k < st.steps)
        if not bool(live.any()):
            break
        _forward_step(objective, params, st, fs, buf, bits, k, live, bound, dtype)
    return _finish_forward(objective, x0, params, st, fs, buf, bits)


def _forward_step(objective, params, st: _Settings, fs: _ForwardState, buf, bits, k: int, live, bound, dtype) -> None:
    """Step k of Algorithm 1 on the live rows (``fs`` and the information buffer are updated in place)."""
    scale, x, m, step_size, prev_value, prev_grad = st.scale, fs.x, fs.m, fs.step_size, fs.prev_value, fs.prev_grad
    _, value, grad = _value_and_grad(objective, _from_fixed(x, scale, dtype), params, False)
    ok = live & torch.isfinite(value) & torch.isfinite(grad).all(-1)
    worse = ok & (value > prev_value + _slack(prev_value)) if st.backtrack else torch.zeros_like(ok)
    w = worse.unsqueeze(-1)
    # An undone step: back to where it started (recomputed exactly), velocity reset, step size halved.
    base = torch.where(w, x + _step(step_size, m), x)
    value = torch.where(worse, prev_value, value)
    grad = torch.where(w, prev_grad, grad)
    s_new = torch.where(worse, step_size / 2, step_size)
    g = torch.round(_clip(grad, st.clip).double() * scale)
    ok = ok & (g.abs().amax(-1) < _GRAD_LIMIT)
    g = torch.where(ok.unsqueeze(-1), g, torch.zeros_like(g)).long()
    m_new = decay(torch.where(w, torch.zeros_like(m), m), buf, st.p, st.q, ok) + g
    proposal = base - _step(s_new, m_new)
    out = ok & ((m_new.abs().amax(-1) >= _STATE_LIMIT) | (proposal.abs().amax(-1).double() > bound))
    if bool(out.any()):  # diverging rows: take this iteration's decay back, leave them as they were
        undecay(m_new - g, buf, st.p, st.q, out)
    done = ok & ~out
    fs.diverged = fs.diverged | (live & ~done)
    undo_now = done & worse
    if bool(undo_now.any()):
        bits[k // 8] |= undo_now.to(torch.uint8) << (k % 8)
        fs.undone_m.append(m[undo_now])
    d1 = done.unsqueeze(-1)
    fs.x, fs.m = torch.where(d1, proposal, x), torch.where(d1, m_new, m)
    fs.step_size = torch.where(done, s_new, step_size)
    fs.prev_value, fs.prev_grad = torch.where(done, value, prev_value), torch.where(d1, grad, prev_grad)
    fs.stop = torch.where(done, torch.full_like(fs.stop, k + 1), fs.stop)
    fs.undone = fs.undone + undo_now.long()


def _finish_forward(objective, x0: torch.Tensor, params, st: _Settings, fs: _ForwardState, buf, bits):
    """minimize's last check (the final step is undone too if it made things worse), the fallback of
    diverged rows to x0, the trajectory and the report."""
    scale, dtype, batch = st.scale, x0.dtype, x0.shape[0]
    x, diverged = fs.x, fs.diverged
    out_fixed = x
    _, value, grad = _value_and_grad(objective, _from_fixed(x, scale, dtype), params, False)
    final_undo = torch.zeros_like(diverged)
    if st.backtrack:
        final_undo = ~diverged & (value > fs.prev_value + _slack(fs.prev_value))
        if bool(final_undo.any()):
            out_fixed = torch.where(final_undo.unsqueeze(-1), x + _step(fs.step_size, fs.m), x)
            _, value, grad = _value_and_grad(objective, _from_fixed(out_fixed, scale, dtype), params, False)
    diverged = diverged | ~(torch.isfinite(value) & torch.isfinite(grad).all(-1))
    x_out = torch.where(diverged.unsqueeze(-1), x0, _from_fixed(out_fixed, scale, dtype))
    if bool(diverged.any()):
        warnings.warn(
            f"reversible_sgd: {int(diverged.sum())}/{batch} problems diverged (NaN/Inf, |x| > max_abs or "
            f"beyond the fixed-point range 2^{61 - st.frac_bits}); they fall back to x0. Lower the step size "
            "or enable clipping.", MinimizeDivergenceWarning, stacklevel=5)
        _, value, grad = _value_and_grad(objective, x_out, params, False)
    undone_m_t = (torch.cat(fs.undone_m) if fs.undone_m
                  else torch.zeros((0, x.shape[1]), dtype=torch.int64, device=x0.device))
    traj = _Trajectory(x, fs.m, fs.step_size, buf, bits, undone_m_t, fs.stop, final_undo, diverged)
    report = {"value": value.detach(), "grad": grad.detach(), "iterations": fs.stop - fs.undone - final_undo.long(),
              "diverged": diverged}
    return traj, x_out, report


def _run_reverse(objective, traj: _Trajectory, x0: torch.Tensor, params, st: _Settings,
                 grad_out: torch.Tensor | None = None, need: tuple[int, ...] = ()):
    """Algorithm 2: walk the trajectory back to x0, one step's gradient at a time. With ``grad_out``,
    also accumulate its vector-Jacobian products; returns (recovered fixed-point x0, grad x0, grads
    of params[i] for i in need)."""
    scale, dtype, p, q = st.scale, x0.dtype, st.p, st.q
    x, m, s, buf = traj.x, traj.m, traj.step_size, traj.buffer
    x0_fixed = _to_fixed(x0, scale)
    params = [t.detach().requires_grad_(True) if i in need else t.detach() for i, t in enumerate(params)]
    grads = [torch.zeros_like(params[i]) for i in need]
    differentiate = grad_out is not None
    if differentiate:
        good = ~traj.diverged.unsqueeze(-1)
        xbar = torch.where(good, grad_out, torch.zeros_like(grad_out))
        # A final undo returned the last step's start point: route the adjoint there (derived in the docs' reversible-learning section).
        mbar = torch.where(traj.final_undo.unsqueeze(-1), s.to(dtype).unsqueeze(-1) * xbar, torch.zeros_like(xbar))
    ptr = traj.undone_m.shape[0]
    for k in reversed(range(int(traj.stop.max()) if x.shape[0] else 0)):
        stepped = k < traj.stop
        s1 = stepped.unsqueeze(-1)
        base = torch.where(s1, x + _step(s, m), x)
        # Rows that did not take step k are evaluated at x0 (any finite point: their values are unused).
        point = _from_fixed(torch.where(s1, base, x0_fixed), scale, dtype)
        xg, _, grad = _value_and_grad(objective, point, params, differentiate)
        with torch.enable_grad():
            g_clipped = _clip(grad, st.clip)
        g = torch.where(s1, torch.round(g_clipped.detach().double() * scale), torch.zeros_like(point, dtype=torch.float64))
        m_prev = undecay(m - g.long(), buf, p, q, stepped)
        if differentiate:
            s_col = s.to(dtype).unsqueeze(-1)
            mbar_new = mbar - s_col * xbar
            gbar = torch.where(s1, mbar_new, torch.zeros_like(mbar_new))
            vjps = torch.autograd.grad(g_clipped, [xg, *(params[i] for i in need)], gbar, allow_unused=True)
            xbar = xbar + vjps[0]
            for j, v in enumerate(vjps[1:]):
                if v is not None:
                    grads[j] = grads[j] + v
            mbar = torch.where(s1, st.momentum * mbar_new, mbar)
        undo = stepped & (((traj.undone_bits[k // 8] >> (k % 8)) & 1) == 1)
        if bool(undo.any()):
            m_prev, s, base, ptr = _reverse_undo(traj, undo, m_prev, s, base, ptr)
            if differentiate:
                mbar = torch.where(undo.unsqueeze(-1), s.to(dtype).unsqueeze(-1) * xbar, mbar)
        x, m = torch.where(s1, base, x), torch.where(s1, m_prev, m)
    _check_reversed(x, m, x0_fixed, buf, ptr)
    if not differentiate:
        return x, None, []
    grad_x0 = xbar + torch.where(traj.diverged.unsqueeze(-1), grad_out, torch.zeros_like(grad_out))
    return x, grad_x0, grads


def _reverse_undo(traj: _Trajectory, undo, m_prev, s, base, ptr: int):
    """Reverse the undone steps among this step's rows: restore their velocity (kept in the forward),
    double their step size back and move their base point; returns (m_prev, s, base, ptr)."""
    rows = undo.nonzero().squeeze(1)
    if bool((m_prev[rows] != 0).any()):
        raise ReversalError("reversible_sgd: an undone step's velocity did not reverse to 0: the "
                            "objective's gradient was not reproduced bit for bit")
    m_prev = m_prev.index_put((rows,), traj.undone_m[ptr - rows.numel():ptr])
    ptr -= rows.numel()
    s = torch.where(undo, s * 2, s)
    base = torch.where(undo.unsqueeze(-1), base - _step(s, m_prev), base)
    return m_prev, s, base, ptr


def _check_reversed(x, m, x0_fixed, buf, ptr: int) -> None:
    """The reversal must land exactly on x0 with zero velocity and every kept bit consumed."""
    if not (torch.equal(x, x0_fixed) and bool((m == 0).all()) and buf.at_start() and ptr == 0):
        missed = int((x != x0_fixed).any(-1).sum())
        raise ReversalError(
            f"reversible_sgd: the reversed trajectory missed x0 on {missed}/{x.shape[0]} problems: the "
            "objective's gradient was not reproduced bit for bit (it must be deterministic, and row b may "
            "depend only on x[b]); on CUDA try torch.use_deterministic_algorithms(True)")


class _ReversibleSGD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, objective, settings: _Settings, report: dict, x0: torch.Tensor, *params: torch.Tensor):
        traj, x_out, info = _run_forward(objective, x0, params, settings)
        report.update(info, trajectory=traj)
        ctx.objective, ctx.settings, ctx.low, ctx.n_params = objective, settings, traj.buffer.low, len(params)
        ctx.save_for_backward(x0, *params, *traj.tensors())
        return x_out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        saved = ctx.saved_tensors
        n = ctx.n_params
        x0, params = saved[0], saved[1:1 + n]
        traj = _Trajectory.from_tensors(ctx.low, saved[1 + n:])
        need = tuple(i for i in range(n) if ctx.needs_input_grad[4 + i])
        _, grad_x0, grads = _run_reverse(ctx.objective, traj, x0, params, ctx.settings, grad_out, need)
        full: list[torch.Tensor | None] = [None] * n
        for i, g in zip(need, grads):
            full[i] = g
        return None, None, None, grad_x0, *full


@dataclass
class ReversibleResult(MinimizeResult):
    """``minimize``'s report (``tol`` is 0: a fixed number of steps) plus what reversal costs.

    buffer_bytes: bytes the backward keeps beyond ``x0`` and ``params`` (trajectory end, information
        buffer, undo bits and reset velocities). momentum: the fraction (p, q) used for mu.
    """

    buffer_bytes: int = 0
    momentum: tuple[int, int] = (1, 1)
    _reverse: Callable[[], torch.Tensor] | None = field(default=None, repr=False)

    def reverse(self) -> torch.Tensor:
        """Run the trajectory backwards (no gradients) and return the recovered x0 in fixed point
        (int64, value * 2^frac_bits); raises :class:`ReversalError` if it is not x0's exactly."""
        return self._reverse()


def to_fixed(x: torch.Tensor, frac_bits: int = 40) -> torch.Tensor:
    """The fixed-point representation reversible_sgd starts from: round(x * 2^frac_bits), int64."""
    return _to_fixed(x, 2.0**frac_bits)


def reversible_sgd(
    objective: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    *params: torch.Tensor,
    steps: int | torch.Tensor,
    lr: float = 1.0,
    momentum: float = 0.5,
    clip: float | None = None,
    max_abs: float = math.inf,
    frac_bits: int = 40,
    backtrack: bool = True,
) -> ReversibleResult:
    """Minimise ``objective(x, *params) -> (B,)`` from ``x0`` (B, n) by SGD with momentum, each
    problem for ``steps`` iterations (an int, or a (B,) integer tensor of per-problem counts), and
    return the result differentiable w.r.t. ``x0`` and ``params`` by exact reversal.

    The loop is ``minimize(method="sgd", tol=0, max_iter=steps)``'s: clipping at ``clip`` (None:
    off), with ``backtrack`` a step that increases the objective is undone, that problem's step size
    halved and its velocity reset (Maclaurin et al.'s plain algorithm: ``backtrack=False``);
    ``|x| > max_abs`` or a NaN/Inf counts as diverged and returns ``x0``. Row b of the objective may
    depend only on ``x[b]`` and must be deterministic (see the module docstring). ``frac_bits``:
    fractional bits of the fixed-point iterate and velocity. Only first derivatives (the backward
    is not differentiable again).
    """
    if not isinstance(x0, torch.Tensor) or x0.dim() != 2 or not x0.is_floating_point():
        raise ValueError(f"reversible_sgd: x0 must be a floating-point tensor of shape (B, n), got "
                         f"{getattr(x0, 'shape', type(x0).__name__)}")
    if not all(isinstance(t, torch.Tensor) for t in params):
        raise ValueError("reversible_sgd: params must be tensors (pass other settings by closure)")
    batch = x0.shape[0]
    if isinstance(steps, torch.Tensor):
        if steps.shape != (batch,) or steps.is_floating_point():
            raise ValueError(f"reversible_sgd: per-problem steps must be an integer tensor of shape ({batch},), "
                             f"got {steps.dtype} {tuple(steps.shape)}")
        steps_t = steps.to(device=x0.device, dtype=torch.long)
    else:
        steps_t = torch.full((batch,), int(steps), dtype=torch.long, device=x0.device)
    if bool((steps_t < 0).any()):
        raise ValueError("reversible_sgd: steps must be >= 0")
    if not lr > 0:
        raise ValueError(f"reversible_sgd: lr must be > 0, got {lr}")
    if clip is not None and not clip > 0:
        raise ValueError(f"reversible_sgd: clip must be > 0 or None, got {clip}")
    if not 8 <= frac_bits <= 52:
        raise ValueError(f"reversible_sgd: frac_bits must be in [8, 52], got {frac_bits}")
    p, q = momentum_fraction(momentum)
    settings = _Settings(steps_t, float(lr), p, q, clip, float(max_abs), int(frac_bits), bool(backtrack))
    report: dict[str, Any] = {}
    x = _ReversibleSGD.apply(objective, settings, report, x0, *params)
    traj: _Trajectory = report["trajectory"]
    value, grad, diverged = report["value"], report["grad"], report["diverged"]
    stat = relative_stationarity(value, grad)

    def reverse() -> torch.Tensor:
        copy = _Trajectory.from_tensors(traj.buffer.low, traj.tensors())
        return _run_reverse(objective, copy, x0.detach(), params, settings)[0]

    return ReversibleResult(
        x=x, value=value, grad_norm=grad.norm(dim=-1), stationarity=stat, iterations=report["iterations"],
        converged=(stat <= 0) & ~diverged, diverged=diverged, tol=0.0,
        buffer_bytes=traj.nbytes(), momentum=(p, q), _reverse=reverse)
