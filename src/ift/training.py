"""What `train.py` does: config -> datamodule -> module -> callbacks/loggers -> Trainer -> fit -> test."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from ift.checkpoints import (RESOLVED_CONFIG, AtomicCheckpointIO, check_matches, load_checkpoint,
                             resolve_checkpoint, run_dir_of)
from ift.data import DatasetNotFoundError
from ift.errors import ConfigError, IFTError
from ift.validation import validate_config
from ift.wandb_utils import finish_wandb, prepare_wandb

log = logging.getLogger(__name__)


def log_lightning_through_root() -> None:
    """train.py imports Lightning after Hydra has set up logging (config errors come sooner): then
    Lightning's own console handler would print every message a second time, so once Hydra's
    handlers are there, Lightning's messages go through them only (console and the run's log file)."""
    import lightning

    if logging.getLogger().hasHandlers():
        logging.getLogger("lightning").removeHandler(lightning._console)


log_lightning_through_root()


def instantiate_group(group: DictConfig | None, name: str) -> list[Any]:
    """Instantiate every `_target_` entry of a config group such as `callbacks` or `logger`."""
    if not group:
        return []
    return [instantiate_checked(node, f"{name}.{key}") for key, node in group.items()
            if isinstance(node, DictConfig) and "_target_" in node]


class PerRankSeed(pl.Callback):
    """Reseed torch per process at setup: `seed_everything` gives every DDP rank the same seed, which
    would make the training noise (SAVI's reparameterisation draws, PGD's random start) identical
    on all ranks: unbiased but correlated, i.e. noisier gradients than one device on the same batch."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def setup(self, trainer, pl_module, stage: str) -> None:
        torch.manual_seed(self.seed + trainer.global_rank)


def instantiate_checked(node: DictConfig, group: str, **kwargs) -> Any:
    """`instantiate`, with a bad value reported as one ConfigError line instead of Hydra's wrapper."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (ValueError, TypeError)):
            raise ConfigError(f"{group} ({node.get('_target_')}): {cause}") from None
        raise


def to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def run_training(cfg: DictConfig) -> dict[str, float]:
    validate_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    ckpt = resolve_checkpoint(cfg.get("ckpt_path"), Path(cfg.paths.log_dir) / cfg.task_name)
    prepare_wandb(cfg, resumed_run_dir=run_dir_of(ckpt) if ckpt else None)

    # Model first: its hyperparameter checks fail before any data is read.
    model = instantiate_checked(cfg.model, "model", _convert_="all")
    if ckpt is not None:
        check_matches(model, load_checkpoint(ckpt), ckpt,
                      fix=f"resume with the model config it was trained with (see {run_dir_of(ckpt) / RESOLVED_CONFIG})")
    datamodule = instantiate_checked(cfg.data, "data")
    callbacks = [*instantiate_group(cfg.get("callbacks"), "callbacks"), PerRankSeed(cfg.seed)]
    loggers: list[Logger] = instantiate_group(cfg.get("logger"), "logger")
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                      plugins=[AtomicCheckpointIO()])

    resolved = OmegaConf.to_container(cfg, resolve=True)
    if trainer.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(resolved), out_dir / RESOLVED_CONFIG)
        if ckpt is not None:
            (out_dir / "resumed_from.txt").write_text(f"{ckpt.resolve()}\n")
    for logger in loggers:
        logger.log_hyperparams(resolved)
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            (out_dir / "wandb_id.txt").write_text(f"{logger.version}\n")

    metrics: dict[str, float] = {}
    try:
        if cfg.get("train", True):
            log.info("Training %s on %s", cfg.model._target_, cfg.data._target_)
            trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
            metrics.update(to_floats(trainer.callback_metrics))
        if cfg.get("test", True):
            best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
            if best is None:
                log.warning("No best checkpoint (checkpointing off or no validation): testing the current weights")
            results = trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True)
            test_metrics = to_floats(results[0]) if results else {}
            metrics.update(test_metrics)
            if trainer.is_global_zero:
                (out_dir / "test_metrics.json").write_text(json.dumps(
                    {"ckpt_path": best, "metrics": test_metrics}, indent=2))
    except DatasetNotFoundError as err:
        raise ConfigError(str(err)) from None
    except IFTError:
        raise
    except Exception:
        log.exception("Run failed; checkpoints and logs so far are in %s", out_dir)
        raise
    finally:
        finish_wandb(loggers)
    return metrics
