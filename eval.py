"""Evaluate a checkpoint: `python eval.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt`."""

import logging
import sys

import hydra
from omegaconf import DictConfig

import ift.config  # noqa: F401  (registers the config resolvers)
from ift.errors import IFTError
from ift.evaluation import run_evaluation

log = logging.getLogger("eval")


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        run_evaluation(cfg)
    except IFTError as err:
        log.error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
