"""W&B without surprises: offline unless asked, never a login prompt, one run across resumes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


def has_wandb_credentials() -> bool:
    import wandb

    try:
        return bool(wandb.login(prompt=False, verify=False))
    except Exception:  # no key, bad settings file, ...: treat as not logged in
        return False


def prepare_wandb(cfg: DictConfig, resumed_run_dir: Path | None = None) -> None:
    """Adjust `cfg.logger.wandb` in place before it is instantiated.

    - online without credentials would prompt for a key: fall back to offline with a warning
      (the run can be uploaded later with `wandb sync`);
    - resuming from a checkpoint of a run that logged to W&B continues that W&B run.
    """
    node = (cfg.get("logger") or {}).get("wandb")
    if node is None:
        return
    with open_dict(node):
        if not node.get("offline", True) and not has_wandb_credentials():
            log.warning("W&B online mode asked for but no credentials (WANDB_API_KEY or `wandb login`): "
                        "logging offline; upload later with `wandb sync <run>/wandb/offline-run-*`")
            node.offline = True
        id_file = resumed_run_dir / "wandb_id.txt" if resumed_run_dir else None
        if node.get("id") is None and id_file is not None and id_file.is_file():
            node.id = id_file.read_text().strip()
            node.resume = "allow"
            log.info("Resuming W&B run %s", node.id)


def finish_wandb(loggers: list[Logger]) -> None:
    """Always close the W&B run (also after an exception) so its files are complete.

    wandb-core does not write `files/wandb-summary.json` for offline runs; we write it, so the
    final metrics of an offline run can be read without syncing.
    """
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        run = wandb.run
        if run is None:
            return
        try:
            summary = {k: run.summary.get(k) for k in run.summary.keys()}
            summary = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}
            (Path(run.dir) / "wandb-summary.json").write_text(json.dumps(summary, indent=2))
        except Exception as err:  # never lose the run over its summary file
            log.warning("could not write the W&B summary file: %s", err)
        wandb.finish()
