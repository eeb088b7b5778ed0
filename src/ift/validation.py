"""Config checks that run before any data is loaded: one clear line per mistake."""

from __future__ import annotations

from omegaconf import DictConfig

from ift.errors import ConfigError


def validate_config(cfg: DictConfig) -> None:
    for key in ("data", "model", "trainer"):
        if cfg.get(key) is None or "_target_" not in cfg[key]:
            raise ConfigError(f"config group `{key}` is missing or has no _target_; pick one, e.g. {key}=<name>")
    if cfg.get("seed") is not None and not isinstance(cfg.seed, int):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")
    batch_size = cfg.data.get("batch_size")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"data.batch_size must be a positive integer, got {batch_size!r}")
    lr = cfg.model.get("lr")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"model.lr must be > 0, got {lr!r}")
