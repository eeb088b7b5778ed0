"""Train a model: `python train.py model=savi_ift` (configs/train.yaml lists every group)."""

import logging
import sys

import hydra
from omegaconf import DictConfig

import ift.config  # noqa: F401  (registers the config resolvers, silences third-party noise)
from ift.errors import IFTError
from ift.validation import validate_config

log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        validate_config(cfg)  # before the heavy imports (torch, Lightning: seconds)
        from ift.training import run_training

        metrics = run_training(cfg)
    except IFTError as err:
        log.error("%s", err)
        sys.exit(1)
    return metrics.get(cfg.monitor.metric)  # for Hydra sweepers


if __name__ == "__main__":
    main()
