"""Memory held for backward by one SAVI training step: flat in K under the IFT, linear in K when
unrolled, ~sqrt(K) when unrolled with checkpointing (bytes counted with saved_tensors_hooks)."""

from __future__ import annotations

import math

import torch

from ift.savi.module import SAVIModule
from ift.telemetry import SavedTensorCounter


def saved_bytes(mode: str, steps: int) -> int:
    torch.manual_seed(0)
    module = SAVIModule(input_shape=[1, 8, 8], mode=mode, latent_dim=4, hidden=[32],
                        inner={"method": "sgd", "lr": 0.1, "max_iter": steps, "tol": 0.0, "nonstationary": "ift"})
    x = torch.rand(16, 1, 8, 8)
    with SavedTensorCounter() as counter:
        loss = module.training_step((x, torch.zeros(16, dtype=torch.long)), 0)
    held = counter.live_bytes
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    return held


def test_ift_memory_is_flat_and_unrolled_memory_grows_linearly_in_steps():
    ift = [saved_bytes("savi_ift", k) for k in (4, 12, 20)]
    unrolled = [saved_bytes("savi_unrolled", k) for k in (4, 12, 20)]
    assert ift[0] == ift[1] == ift[2]
    # equal increments per step: linear growth
    per_step_a = (unrolled[1] - unrolled[0]) / 8
    per_step_b = (unrolled[2] - unrolled[1]) / 8
    assert per_step_a > 0 and abs(per_step_a - per_step_b) <= 0.02 * per_step_a
    assert unrolled[2] > 3 * ift[2]


def test_checkpointed_memory_grows_like_sqrt_steps():
    ks = (16, 64)
    ckpt = [saved_bytes("savi_checkpointed", k) for k in ks]
    unrolled = [saved_bytes("savi_unrolled", k) for k in ks]
    assert ckpt[1] < unrolled[1] / 4
    # K x4 -> unrolled x~4, checkpointed x~2 (sqrt(K) segments each holding sqrt(K) steps' inputs)
    growth = ckpt[1] / ckpt[0]
    assert growth < 0.75 * (unrolled[1] / unrolled[0]), (growth, unrolled)
    assert growth < 1.5 * math.sqrt(4)


def test_checkpointed_gradient_equals_unrolled():
    grads = {}
    for mode in ("savi_unrolled", "savi_checkpointed"):
        torch.manual_seed(0)
        module = SAVIModule(input_shape=[1, 8, 8], mode=mode, latent_dim=4, hidden=[32],
                            inner={"max_iter": 9}).double()
        x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        torch.manual_seed(2)
        module.training_step((x, None), 0).backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in module.parameters()])
    torch.testing.assert_close(grads["savi_checkpointed"], grads["savi_unrolled"], rtol=1e-9, atol=1e-10)
