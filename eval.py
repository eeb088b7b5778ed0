"""Evaluate a checkpoint: `python eval.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt`."""

import logging
import sys

import hydra
from omegaconf import DictConfig

import ift.config  # noqa: F401  (registers the config resolvers, silences third-party noise)
from ift.errors import IFTError
from ift.validation import check_ckpt_file, check_eval_keys, check_eval_overrides

log = logging.getLogger("eval")


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        check_eval_keys(cfg.eval)
        check_ckpt_file(cfg.ckpt_path)  # before the heavy imports (torch, Lightning: seconds)
        from ift.evaluation import run_evaluation  # heavy (torch, Lightning): after Hydra's checks

        run_evaluation(cfg)
    except IFTError as err:
        log.error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    try:
        check_eval_overrides(sys.argv[1:])
    except IFTError as err:
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(1)
    main()
