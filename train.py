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
def main(cfg: DictConfig) -> float | list[float]:
    try:
        validate_config(cfg)  # before the heavy imports (torch, Lightning: seconds)
        from ift.training import run_training

        metrics = run_training(cfg)
    except IFTError as err:
        log.error("%s", err)
        sys.exit(1)
    return optimized_value(metrics, cfg.get("optimized_metric") or cfg.monitor.metric)


def optimized_value(metrics: dict[str, float], names) -> float | list[float]:
    """What a Hydra sweeper optimises: one metric, or a list of them (multi-objective). A metric the
    run did not log (it diverged, or the name is wrong) is NaN, which Optuna records as a failed trial."""
    if isinstance(names, str):
        if names not in metrics:
            log.warning("optimized_metric %s was not logged (logged: %s)", names, ", ".join(sorted(metrics)))
        return metrics.get(names, float("nan"))
    return [optimized_value(metrics, name) for name in names]


if __name__ == "__main__":
    main()
