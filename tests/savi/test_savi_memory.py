"""Memory of one SAVI training step: flat in K under the IFT, linear in K when unrolled."""

from __future__ import annotations

import torch

from ift.savi.module import SAVIModule
from ift.telemetry import SavedTensorCounter


def saved_bytes(mode: str, steps: int) -> int:
    torch.manual_seed(0)
    module = SAVIModule(input_shape=[1, 8, 8], mode=mode, latent_dim=4, hidden=[32],
                        inner={"steps": steps, "tol": 0.0})
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
