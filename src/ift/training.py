"""What `train.py` does: config -> datamodule -> module -> callbacks/loggers -> Trainer -> fit -> test."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from ift.checkpoints import (RESOLVED_CONFIG, AtomicCheckpointIO, InterruptCheckpoint, check_matches,
                             load_checkpoint, resolve_checkpoint, run_dir_of)
from ift.config import module_config
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


def instantiate_model(model: DictConfig) -> pl.LightningModule:
    """The model config's LightningModule, without its `runs_on` declaration (not a hyperparameter)."""
    return instantiate_checked(module_config(model), "model", _convert_="all")


def to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def processes_per_node(trainer_cfg: DictConfig) -> int:
    devices = trainer_cfg.get("devices")
    return devices if "ddp" in str(trainer_cfg.get("strategy", "")) and isinstance(devices, int) else 1


def auto_threads(processes: int = 1) -> int:
    """The CPUs not already busy (usable CPUs minus the 1-minute load average), shared among this
    node's processes, and never more than torch's own default (or OMP_NUM_THREADS): on a shared
    machine a second thread per process only waits for a core another program holds."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    free = cpus - round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else cpus
    return max(1, min(torch.get_num_threads(), free // max(1, processes)))


def apply_threads(setting: int | str, processes: int = 1) -> int:
    threads = auto_threads(processes) if setting == "auto" else int(setting)
    torch.set_num_threads(threads)
    log.info("torch CPU threads: %d (threads=%s; set threads=N to choose)", threads, setting)
    return threads


def build_trainer(cfg: DictConfig) -> tuple[pl.Trainer, list[Logger]]:
    callbacks = [*instantiate_group(cfg.get("callbacks"), "callbacks"), PerRankSeed(cfg.seed),
                 InterruptCheckpoint(Path(cfg.paths.output_dir) / "checkpoints")]
    loggers: list[Logger] = instantiate_group(cfg.get("logger"), "logger")
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                      plugins=[AtomicCheckpointIO()])
    return trainer, loggers


def record_run(cfg: DictConfig, trainer: pl.Trainer, loggers: list[Logger], ckpt: Path | None) -> None:
    """The resolved config (and what the run resumed from) in the run folder; hyperparameters to the loggers."""
    out_dir = Path(cfg.paths.output_dir)
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


def fit_and_test(cfg: DictConfig, trainer: pl.Trainer, model, datamodule, ckpt: Path | None) -> dict[str, float]:
    metrics: dict[str, float] = {}
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
            (Path(cfg.paths.output_dir) / "test_metrics.json").write_text(json.dumps(
                {"ckpt_path": best, "metrics": test_metrics}, indent=2))
    return metrics


def run_training(cfg: DictConfig) -> dict[str, float]:
    validate_config(cfg)
    apply_threads(cfg.get("threads", "auto"), processes_per_node(cfg.trainer))
    pl.seed_everything(cfg.seed, workers=True)
    ckpt = resolve_checkpoint(cfg.get("ckpt_path"), Path(cfg.paths.log_dir) / cfg.task_name)
    prepare_wandb(cfg, resumed_run_dir=run_dir_of(ckpt) if ckpt else None)

    # Model first: its hyperparameter checks fail before any data is read.
    model = instantiate_model(cfg.model)
    if ckpt is not None:
        check_matches(model, load_checkpoint(ckpt), ckpt,
                      fix=f"resume with the model config it was trained with (see {run_dir_of(ckpt) / RESOLVED_CONFIG})")
    datamodule = instantiate_checked(cfg.data, "data")
    trainer, loggers = build_trainer(cfg)
    record_run(cfg, trainer, loggers, ckpt)
    try:
        return fit_and_test(cfg, trainer, model, datamodule, ckpt)
    except DatasetNotFoundError as err:
        raise ConfigError(str(err)) from None
    except SIGTERMException:  # a SystemExit with code 0: say it was killed (128 + SIGTERM, as the shell does)
        raise SystemExit(143) from None
    except IFTError:
        raise
    except Exception:
        log.exception("Run failed; checkpoints and logs so far are in %s", cfg.paths.output_dir)
        raise
    finally:
        finish_wandb(loggers)
