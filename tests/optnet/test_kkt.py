"""ift.optnet.kkt: the CPU Cholesky path and the host reads of the interior point loop."""

import pytest
import torch

from ift.optnet import kkt, solve_qp_with_info

from .test_qp import random_qp


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [8, 100])  # torch's batched Cholesky below LAPACK_MIN_SIZE, potrf per matrix above
def test_cholesky_unchecked_lower_triangle_and_failures(dtype, n):
    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, n, n, dtype=dtype, generator=g)
    M = M @ M.mT + n * torch.eye(n, dtype=dtype)
    M[2] = -M[2]  # not positive definite
    L, failed = kkt.cholesky_unchecked(M)
    assert failed.tolist() == [False, False, True, False, False, False]
    ok = ~failed
    torch.testing.assert_close(L[ok].tril(), torch.linalg.cholesky(M[ok]))
    # Only the lower triangle is meaningful; triangular solves read nothing else.
    b = torch.randn(5, n, 1, dtype=dtype, generator=g)
    x = torch.linalg.solve_triangular(L.mT[ok], torch.linalg.solve_triangular(L[ok], b, upper=False), upper=True)
    torch.testing.assert_close(M[ok] @ x, b, atol=1e-4 if dtype == torch.float32 else 1e-10, rtol=0)
    assert M[0, 0, 0] > 0  # the input is left alone unless overwrite=True


def test_lapack_path_is_right_even_if_scipy_does_not_factorise_in_place(monkeypatch):
    """The in-place potrf relies on scipy not copying; if it ever does, its result is taken."""
    copying = {dt: (lambda a, _f=f, **kw: _f(a.copy(order="F"), **kw)) for dt, f in kkt._POTRF.items()}
    monkeypatch.setattr(kkt, "_POTRF", copying)
    M = torch.randn(3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    M = M @ M.mT + 64 * torch.eye(64, dtype=torch.float64)
    L, failed = kkt.cholesky_unchecked(M)
    assert not failed.any()
    torch.testing.assert_close(L.tril(), torch.linalg.cholesky(M))


def test_interior_point_reads_the_host_once_per_iteration(monkeypatch):
    # Issue 15: each interior point iteration reads one small tensor from the device (is some
    # example due a polish, did some factorisation fail); an iteration with a polish adds one read
    # (how many examples finished), the polish itself a few (its active sets' sizes).
    import ift.optnet.qp as qp_module

    reads, inside = [], []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real: reads.append(bool(inside)) or _r(self, *a))

    def wrap(fn, counter):
        def wrapped(*a, **k):
            inside.append(1)
            counter.append(1)
            try:
                return fn(*a, **k)
            finally:
                inside.pop()
        return wrapped

    polishes, solves = [], []
    monkeypatch.setattr(qp_module, "_polish", wrap(qp_module._polish, polishes))
    real_solve = qp_module._solve
    loop_reads = []

    def solve(*a, **k):
        before = len(reads)
        out = real_solve(*a, **k)
        loop_reads.append(sum(1 for r in reads[before:] if not r))
        return out

    monkeypatch.setattr(qp_module, "_solve", solve)
    Q, q, G, h, _, _ = random_qp(32, 40, 40, 0, seed=9)
    sol = solve_qp_with_info(Q, q, G, h)
    assert (sol.status == 0).all() and len(loop_reads) == 1
    passes = int(sol.iterations.max()) + 1
    assert loop_reads[0] == 1 + passes + len(polishes)  # + 1: the starting point's factorisation
