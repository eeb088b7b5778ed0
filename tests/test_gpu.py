"""The same math on CUDA: solve_qp, the IFT core and SAVI (bf16 autocast, memory) against CPU / closed forms.

Marked `gpu`: deselected by default (`pytest -m gpu` runs them; `make gpu-check` does too), and skipped
with the reason when no CUDA device is visible.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from ift.implicit import ImplicitSolveWarning
from ift.implicit.examples import ridge_hypergradient, ridge_hypergradient_closed_form
from ift.optnet import QPStatus, solve_qp, solve_qp_with_info
from ift.savi.module import NonStationaryWarning, SAVIModule
from tests.optnet.test_qp import random_qp  # strictly feasible QPs as in the OptNet timing study

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")]
CUDA = torch.device("cuda")


def qp_solution_and_grads(args, device, dtype, **kwargs):
    inputs = [t.to(device, dtype).requires_grad_() for t in args]
    z = solve_qp(*inputs, **kwargs)
    weights = torch.linspace(-1, 1, z.shape[-1], dtype=dtype, device=device)
    grads = torch.autograd.grad((z * weights).sum(), inputs)
    return z.detach().cpu().double(), [g.cpu().double() for g in grads]


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-7), (torch.float32, 1e-3)])
def test_solve_qp_on_cuda_matches_cpu_float64(dtype, atol):
    args = random_qp(64, 30, 40, 10, seed=1)
    z_ref, g_ref = qp_solution_and_grads(args, "cpu", torch.float64)
    z, grads = qp_solution_and_grads(args, CUDA, dtype)
    torch.testing.assert_close(z, z_ref, atol=atol, rtol=0)
    for name, g, r in zip("Q q G h A b".split(), grads, g_ref):
        scale = r.abs().max()
        assert (g - r).abs().max() <= 10 * atol * max(1.0, float(scale)), name


def test_solve_qp_on_cuda_reports_convergence_and_stays_on_device():
    Q, q, G, h, A, b = (t.to(CUDA) for t in random_qp(32, 20, 20, 5, seed=2))
    sol = solve_qp_with_info(Q, q, G, h, A, b)
    assert sol.z.device.type == "cuda" and sol.status.device.type == "cuda"
    assert bool((sol.status == QPStatus.CONVERGED).all())


@pytest.mark.parametrize("dtype,rel_tol", [(torch.float64, 1e-8), (torch.float32, 1e-3)])
def test_ridge_hypergradient_on_cuda_matches_the_closed_form(dtype, rel_tol):
    g = torch.Generator().manual_seed(3)
    d = 256
    X, Xv = torch.randn(2 * d, d, generator=g), torch.randn(d, d, generator=g)
    y, yv = torch.randn(2 * d, generator=g), torch.randn(d, generator=g)
    X, y, Xv, yv = (t.to(CUDA, dtype) for t in (X, y, Xv, yv))
    lam = torch.tensor(0.25 * d, dtype=dtype, device=CUDA)
    _, grad_ref = ridge_hypergradient_closed_form(*(t.double() for t in (X, y, Xv, yv, lam)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplicitSolveWarning)
        _, grad = ridge_hypergradient(X, y, Xv, yv, lam, iters=2000, method="implicit")
    assert grad.device.type == "cuda"
    assert abs(float(grad) - float(grad_ref)) <= rel_tol * abs(float(grad_ref))


def digits(batch: int) -> torch.Tensor:
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[:batch], dtype=torch.float32) / 16.0
    return images.unsqueeze(1)


def savi_grads(module: SAVIModule, x: torch.Tensor, autocast: bool) -> torch.Tensor:
    module.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same noise draws with and without autocast
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = module.training_step((x, None), 0)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def test_savi_ift_under_bf16_autocast_converges_and_matches_float32():
    """What trainer.precision=bf16-mixed does to a savi_ift step: the inner solve and the IFT's CG
    must keep converging (they run in float32), and the gradient must stay close to float32's."""
    torch.manual_seed(0)
    module = SAVIModule(input_shape=[1, 8, 8], mode="savi_ift", latent_dim=8, hidden=[128, 128],
                        gamma={"init": 0.02, "learn": True}).to(CUDA)
    x = digits(128).to(CUDA)
    reference = savi_grads(module, x, autocast=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplicitSolveWarning)
        warnings.simplefilter("error", NonStationaryWarning)
        mixed = savi_grads(module, x, autocast=True)
    info = module.solves.last["ift"]
    assert bool(info.converged.all()), f"CG: {int((~info.converged).sum())}/{info.converged.numel()} not converged"
    cos = torch.nn.functional.cosine_similarity(mixed, reference, dim=0)
    assert cos > 0.99, float(cos)


def peak_step_bytes(mode: str, steps: int) -> int:
    torch.manual_seed(0)
    module = SAVIModule(input_shape=[1, 8, 8], mode=mode, latent_dim=8, hidden=[128, 128],
                        inner={"method": "sgd", "lr": 0.1, "max_iter": steps, "tol": 0.0, "nonstationary": "ift"}
                        ).to(CUDA)
    x = digits(256).to(CUDA)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    module.training_step((x, None), 0).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_savi_cuda_peak_memory_is_flat_in_steps_for_ift_and_grows_when_unrolled():
    ift = [peak_step_bytes("savi_ift", k) for k in (10, 100)]
    unrolled = [peak_step_bytes("savi_unrolled", k) for k in (10, 100)]
    assert ift[1] <= 1.1 * ift[0], ift
    assert unrolled[1] > 4 * unrolled[0], unrolled
    assert unrolled[1] > 4 * ift[1], (unrolled, ift)
