"""What `eval.py` does: load a checkpoint safely, rebuild its run's data and model, test, report."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from ift.checkpoints import RESOLVED_CONFIG, check_matches, load_checkpoint, resolve_checkpoint, run_dir_of
from ift.data import DatasetNotFoundError
from ift.errors import CheckpointError, ConfigError
from ift.training import apply_threads, instantiate_checked, instantiate_model
from ift.validation import check_data_root, check_eval_keys, check_threads

log = logging.getLogger(__name__)


def load_run_config(ckpt: Path) -> DictConfig:
    path = run_dir_of(ckpt) / RESOLVED_CONFIG
    if not path.is_file():
        raise CheckpointError(
            f"no {RESOLVED_CONFIG} next to the checkpoint's run (looked for {path}); eval.py evaluates "
            f"checkpoints written by train.py inside their run directory <run>/checkpoints/")
    return OmegaConf.load(path)


def build_model(run_cfg: DictConfig, state: dict[str, Any], ckpt: Path) -> pl.LightningModule:
    model = instantiate_model(run_cfg.model)
    check_matches(model, state, ckpt, fix=f"its run config {run_dir_of(ckpt) / RESOLVED_CONFIG} says "
                  f"model {run_cfg.model._target_}: evaluate the checkpoint with the run it was saved in")
    model.load_state_dict(state["state_dict"])
    return model


def print_table(metrics: dict[str, float], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        table.add_row(key, f"{metrics[key]:.6g}")
    Console().print(table)


def run_evaluation(cfg: DictConfig) -> dict[str, float]:
    check_threads(cfg.get("threads", "auto"))
    check_eval_keys(cfg.get("eval"))
    apply_threads(cfg.get("threads", "auto"))
    ckpt = resolve_checkpoint(cfg.ckpt_path, Path(cfg.paths.log_dir) / "train")
    state = load_checkpoint(ckpt)
    run_cfg = load_run_config(ckpt)
    overrides = {k: v for k, v in (cfg.get("data") or {}).items() if v is not None}
    data_cfg = OmegaConf.merge(run_cfg.data, overrides)
    check_data_root(data_cfg)
    pl.seed_everything(run_cfg.get("seed", cfg.seed), workers=True)

    model = build_model(run_cfg, state, ckpt)
    datamodule = instantiate_checked(data_cfg, "data")
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, inference_mode=False,
                         **OmegaConf.to_container(cfg.trainer, resolve=True))
    try:
        results = trainer.test(model, datamodule=datamodule, verbose=False)  # the table is printed below
    except DatasetNotFoundError as err:
        raise ConfigError(f"{err} (eval.py: override with data.root=...)") from None
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "evaluate_extra"):
        eval_cfg = OmegaConf.to_container(cfg.eval, resolve=True)
        metrics.update(model.evaluate_extra(datamodule, eval_cfg, out_dir))

    report = {"ckpt_path": str(ckpt), "model": run_cfg.model._target_, "data": data_cfg._target_,
              "metrics": metrics}
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    print_table(metrics, title=f"{ckpt}")
    log.info("Wrote %s", out_dir / "metrics.json")
    return metrics
