"""What happens when a loss or gradient is NaN/Inf: skip the step (and count it) or stop clearly."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch

from ift.errors import IFTError

log = logging.getLogger(__name__)
POLICIES = ("skip", "stop")


class NonFiniteStepError(IFTError, FloatingPointError):
    """Training stopped on a non-finite loss or gradient (policy `stop`)."""


class NonFiniteGuard(pl.Callback):
    """Checks every gradient before the optimizer step.

    - `skip` (default): drop all gradients of this step (`grad = None`, which torch optimizers
      treat as "no update": weights, momentum and Adam moments stay untouched), count it in
      `train/skipped_steps`, and stop after `max_consecutive` skips in a row.
    - `stop`: raise at once, naming the global step and the first offending parameter.
    """

    def __init__(self, policy: str = "skip", max_consecutive: int = 20) -> None:
        if policy not in POLICIES:
            raise ValueError(f"callbacks.nonfinite_guard.policy={policy!r} is unknown; use one of {POLICIES}")
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        bad = next((name for name, p in pl_module.named_parameters()
                    if p.grad is not None and not torch.isfinite(p.grad).all()), None)
        if bad is None:
            self.consecutive = 0
        else:
            message = f"non-finite gradient at global step {trainer.global_step} in parameter `{bad}`"
            if self.policy == "stop" or self.consecutive + 1 >= self.max_consecutive:
                raise NonFiniteStepError(
                    f"{message}; stopping (policy={self.policy}, {self.consecutive + 1} bad steps in a row). "
                    f"The last good weights are in checkpoints/last.ckpt; lower the learning rate or "
                    f"use callbacks.nonfinite_guard.policy=skip.")
            log.warning("%s: skipping this step", message)
            for p in pl_module.parameters():
                p.grad = None
            self.skipped += 1
            self.consecutive += 1
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
