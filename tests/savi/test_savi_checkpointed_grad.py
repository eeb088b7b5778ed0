"""`torch.autograd.grad` on a savi_checkpointed loss with `model.inner.checkpoint_reentrant=false`
(the default reentrant variant raises "torch.utils.checkpoint is incompatible with .grad()") gives the
unrolled gradient."""

from __future__ import annotations

import pytest
import torch

from ift.savi.module import SAVIModule


def loss_and_params(mode: str, inner: dict) -> tuple[torch.Tensor, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    module = SAVIModule(input_shape=[1, 8, 8], mode=mode, latent_dim=4, hidden=[32], inner=inner).double()
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.manual_seed(2)  # the same reparameterisation draws in both modes
    return module.training_step((x, None), 0), list(module.parameters())


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("inner", [{"max_iter": 9}, {"method": "sgd", "lr": 0.1, "max_iter": 8, "tol": 0.0}],
                         ids=["newton", "sgd"])
def test_autograd_grad_through_checkpointed_segments_equals_unrolled(inner):
    grads = {}
    for mode in ("savi_unrolled", "savi_checkpointed"):
        loss, params = loss_and_params(mode, {**inner, "checkpoint_reentrant": False})
        grads[mode] = torch.autograd.grad(loss, params, allow_unused=True)
    assert len(grads["savi_checkpointed"]) == len(grads["savi_unrolled"]) > 0
    for ckpt, unrolled in zip(grads["savi_checkpointed"], grads["savi_unrolled"]):
        assert (ckpt is None) == (unrolled is None)
        if unrolled is not None:
            torch.testing.assert_close(ckpt, unrolled, rtol=1e-9, atol=1e-12)
    flat = torch.cat([g.flatten() for g in grads["savi_unrolled"] if g is not None])
    assert flat.abs().max() > 1e-3  # the comparison is not between zeros


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_autograd_grad_through_checkpointed_segments_supports_create_graph():
    """A second derivative through the checkpointed loop (what autograd.grad makes possible)."""
    loss, params = loss_and_params("savi_checkpointed", {"method": "sgd", "lr": 0.1, "max_iter": 4, "tol": 0.0,
                                                          "checkpoint_reentrant": False})
    weight = params[0]
    (grad,) = torch.autograd.grad(loss, [weight], create_graph=True)
    (second,) = torch.autograd.grad(grad.pow(2).sum(), [weight])
    assert torch.isfinite(second).all() and second.abs().max() > 0
