"""Under bf16 autocast (trainer.precision=bf16-mixed) the savi_ift inner solve and its IFT attach
keep float32: the solve converges as in float32 and the gradient matches float32's."""

from __future__ import annotations

import warnings

import torch

from ift.data import DigitsDataModule
from ift.savi.module import NonStationaryWarning, SAVIModule


def digits_module() -> SAVIModule:
    """The savi_ift defaults (configs/model/vae.yaml + savi_ift.yaml) on 8x8 digits."""
    torch.manual_seed(0)
    return SAVIModule(
        input_shape=[1, 8, 8], mode="savi_ift", latent_dim=8, hidden=[128, 128], gamma={"init": 0.02},
        inner={"method": "newton", "max_iter": 20, "tol": 1e-5, "curvature": "exact", "eta": 1.0, "nonstationary": "drop"},
        ift={"linear_solver": "cg", "tol": 1e-6, "max_iter": 100},
    )


def digits_batch(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    dm = DigitsDataModule(batch_size=n)
    dm.setup("fit")
    x = next(iter(dm.train_dataloader()))[0].flatten(1)
    return x, torch.randn(4, n, 8, generator=torch.Generator().manual_seed(1))


def refined_gradient(module: SAVIModule, x, eps, autocast: bool):
    """Gradient of -ELBO at the refined lambda, with only the refinement under bf16 autocast
    (lambda_0 and the outer ELBO in float32), so any difference comes from the solve itself."""
    module.zero_grad()
    lam0 = module.vae.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        result = module.refine(x, lam0, eps)
    loss = -module.vae.elbo(x, result.x, eps).mean()
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
    return result, grad


def test_bf16_autocast_inner_solve_converges_and_gradient_matches_float32():
    x, eps = digits_batch()
    module = digits_module()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonStationaryWarning)  # no example falls back to lambda_0
        result16, grad16 = refined_gradient(module, x, eps, autocast=True)
    result32, grad32 = refined_gradient(module, x, eps, autocast=False)
    assert result16.x.dtype == torch.float32
    assert float(result16.nonstationary.float().mean()) == 0.0 and not bool(result16.diverged.any())
    assert float(result16.stationarity.max()) <= 1e-5
    torch.testing.assert_close(result16.x, result32.x, rtol=1e-5, atol=1e-5)
    rel = float((grad16 - grad32).norm() / grad32.norm())
    assert rel < 1e-4, rel
    assert float(module.solves.last["inner"].fallback) == 0  # every example took the IFT path


def test_bf16_training_step_keeps_the_solve_stationary():
    """The whole training step under autocast, as Lightning runs it: encoder and outer ELBO in bf16,
    the solve in float32; the gradient stays close to the float32 step's (bf16 rounding only)."""
    x, _ = digits_batch()
    grads = {}
    for autocast in (True, False):
        module = digits_module()
        torch.manual_seed(2)  # the same noise draws in both runs
        with warnings.catch_warnings():
            warnings.simplefilter("error", NonStationaryWarning)  # no example falls back to lambda_0
            warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer here
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = module.training_step((x.view(-1, 1, 8, 8), None), 0)
        loss.backward()
        grads[autocast] = torch.cat([p.grad.flatten() for p in module.parameters()])
    cos = torch.nn.functional.cosine_similarity(grads[True], grads[False], dim=0)
    assert cos > 0.99, float(cos)
