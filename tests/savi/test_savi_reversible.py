"""savi_reversible: the gradient of unrolling Kim et al.'s SGD loop, from an exact reversal of the
trajectory instead of a stored one (784-dim inputs, latent 8, float64)."""

from __future__ import annotations

import pytest
import torch

from ift.implicit.reversible import to_fixed
from ift.savi.module import SAVIModule

KIM = {"method": "sgd", "lr": 1.0, "momentum": 0.5, "clip": 5.0, "tol": 0.0}


def make(mode: str, steps: int, inner_samples: int = 4) -> SAVIModule:
    torch.manual_seed(0)
    return SAVIModule(input_shape=[1, 28, 28], mode=mode, latent_dim=8, hidden=[128, 128],
                      inner_samples=inner_samples, inner={**KIM, "max_iter": steps}).double()


def batch(size: int = 32) -> torch.Tensor:
    return torch.rand(size, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def gradient(mode: str, steps: int, inner_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    module = make(mode, steps, inner_samples)
    torch.manual_seed(2)  # the same inner and outer noise for both modes
    module.training_step((batch(), None), 0).backward()
    info = module.solves.pop()["inner"]
    return torch.cat([p.grad.flatten() for p in module.parameters()]), info.iterations


@pytest.mark.parametrize("steps,inner_samples", [(20, 4), pytest.param(200, 1, marks=pytest.mark.slow)])
def test_reversible_gradient_equals_unrolled(steps, inner_samples):
    rev, rev_iters = gradient("savi_reversible", steps, inner_samples)
    unr, unr_iters = gradient("savi_unrolled", steps, inner_samples)
    # the same loop: the same steps undone by backtracking, example by example
    assert torch.equal(rev_iters, unr_iters)
    assert (unr_iters < steps).any(), "backtracking never fired: the test would not cover it"
    assert rev.norm() > 0
    assert ((rev - unr).norm() / unr.norm()).item() < 1e-8


def test_reversal_returns_lambda0_exactly():
    module = make("savi_reversible", 50)
    x = batch().flatten(1)
    lam0 = module.vae.encode(x)
    eps = module.vae.sample_eps(x.shape[0], 4, like=x)
    result = module.refine(x, lam0, eps)
    assert (result.x - lam0).abs().max() > 1e-2  # the refinement moved lambda
    assert torch.equal(result.reverse(), to_fixed(lam0))
    # lambda_0 on the fixed-point grid comes back as the same float, bit for bit
    on_grid = (to_fixed(lam0).double() / 2.0**40).detach()
    again = module.refine(x, on_grid, eps)
    assert torch.equal(again.reverse().double() / 2.0**40, on_grid)


def test_buffer_grows_by_the_bits_the_decay_destroys():
    """Per example and step the backward keeps 1 bit per coordinate (momentum 0.5: 16 bits) + 1 bit
    for the backtracking decision, + 8 bytes per coordinate for each undone step (unrolling keeps the
    step's whole graph, ~100 kB per example at this size)."""
    x = batch().flatten(1)
    kept = {}
    for steps in (100, 200):
        module = make("savi_reversible", steps)
        with torch.no_grad():
            lam0 = module.vae.encode(x)
        torch.manual_seed(3)
        result = module.refine(x, lam0, module.vae.sample_eps(x.shape[0], 4, like=x))
        undone = int((steps - result.iterations).sum())
        kept[steps] = result.buffer_bytes - 8 * 16 * undone
    per_step = (kept[200] - kept[100]) / (x.shape[0] * 100)
    assert 2.0 <= per_step <= 2.2, per_step  # 16 / 8 + 1 / 8 bytes, words allocated in 32-bit units


@pytest.mark.parametrize("inner,words", [
    ({"method": "newton"}, "method=newton"),
    ({"method": "adam", "tol": 0.0}, "method=adam"),
    ({"method": "sgd", "tol": 1e-5}, "tol=1e-05"),
    ({"method": "sgd", "tol": 0.0, "momentum": 0.0}, "momentum=0.0"),
])
def test_unsupported_inner_settings_are_one_line(inner, words):
    with pytest.raises(ValueError, match="savi_reversible supports model.inner.method=sgd") as err:
        SAVIModule(input_shape=[1, 8, 8], mode="savi_reversible", inner=inner)
    assert words in str(err.value) and "\n" not in str(err.value)
