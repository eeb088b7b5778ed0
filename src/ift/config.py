"""Hydra/OmegaConf glue shared by train.py, eval.py, the tests and the benchmarks."""

from __future__ import annotations

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

# configs/ of a source checkout (the package is installed editable from it).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def wandb_offline() -> bool:
    """W&B runs offline unless the user asked for online mode through the environment."""
    return os.environ.get("WANDB_MODE", "offline").lower() not in {"online", "run"}


def register_resolvers() -> None:
    """Custom `${...:}` resolvers used in configs/ (idempotent)."""
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)


register_resolvers()


def compose_config(config_name: str, overrides: list[str], run_dir: str | Path):
    """Compose configs/<config_name>.yaml in-process as `python <config_name>.py` would, with the run
    directory set to `run_dir` (for tests, benchmarks and notebooks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    run_dir = Path(run_dir)
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name, overrides=[*overrides, f"hydra.run.dir={run_dir}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        del cfg.hydra
    return cfg
