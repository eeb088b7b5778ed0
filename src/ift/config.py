"""Hydra/OmegaConf glue shared by train.py, eval.py and the tests."""

from __future__ import annotations

import os

from omegaconf import OmegaConf


def wandb_offline() -> bool:
    """W&B runs offline unless the user asked for online mode through the environment."""
    return os.environ.get("WANDB_MODE", "offline").lower() not in {"online", "run"}


def register_resolvers() -> None:
    """Custom `${...:}` resolvers used in configs/ (idempotent)."""
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)


register_resolvers()
