"""Hydra/OmegaConf glue shared by train.py, eval.py, the tests and the benchmarks."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

# configs/ of a source checkout (the package is installed editable from it).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def wandb_offline() -> bool:
    """W&B runs offline unless the user asked for online mode through the environment."""
    return os.environ.get("WANDB_MODE", "offline").lower() not in {"online", "run"}


def run_id() -> str:
    """Name of a run's folder: its start date-time, except inside a multi-task SLURM step (`srun`
    with one task per GPU), where every rank composes its own config at a slightly different time:
    there the job and step ids name the folder, so all ranks of the job share one run directory."""
    job, step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID")
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or "1"
    if job and step and tasks.isdigit() and int(tasks) > 1:
        return f"slurm-{job}.{step}"
    from datetime import datetime

    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")


def register_resolvers() -> None:
    """Custom `${...:}` resolvers used in configs/ (idempotent)."""
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", run_id, use_cache=True)


register_resolvers()


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def silence_third_party_noise() -> None:
    """Drop the messages every run printed that are not the user's business, each matched exactly:
    Lightning's litlogger advertisement, the FutureWarning torch raises when Lightning builds a
    `LeafSpec` (lightning/pytorch/utilities/_pytree.py), and W&B's notice about the `anonymous`
    setting (no longer passed at all: see ift.wandb_utils.WandbLogger)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropMessages("💡 Tip: For seamless cloud"))
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)


silence_third_party_noise()


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


def unwritable_reason(folder: Path) -> str | None:
    """Why `folder` cannot be created and written (None if it can), without creating anything: the
    nearest existing ancestor must be a folder we can write a file in."""
    import tempfile

    probe = folder.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=probe):
            return None
    except OSError as err:
        return f"cannot write in {probe}: {err.strerror or err}"


class Preflight(Callback):
    """Hydra callback, run before Hydra creates any directory or submits any job: an unwritable run
    directory, or a SLURM launch without explicit device counts, is one line naming the key instead
    of Hydra's chained tracebacks (or a job that fails on the cluster)."""

    def on_run_start(self, config, **kwargs) -> None:
        self._check_dir(config, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check_dir(config, "hydra.sweep.dir")
        if "slurm" in str(OmegaConf.select(config, "hydra.launcher._target_", default="")).lower():
            for key in ("trainer.devices", "trainer.num_nodes"):
                value = OmegaConf.select(config, key, default=None)
                if not (isinstance(value, int) and value > 0):
                    fail(f"hydra/launcher=slurm needs {key} to be an explicit count (tasks per node = GPUs per "
                         f"node = trainer.devices), got {value!r}; e.g. trainer.devices=4 trainer.num_nodes=2")

    @staticmethod
    def _check_dir(config, key: str) -> None:
        try:
            folder = Path(str(OmegaConf.select(config, key)))
        except Exception:  # an interpolation Hydra resolves only later: leave it to Hydra
            return
        reason = unwritable_reason(folder)
        if reason is not None:
            log_dir = OmegaConf.select(config, "paths.log_dir", default=None)
            fail(f"cannot create the run directory {folder} ({reason}); set paths.log_dir=<a writable folder> "
                 f"(now {log_dir}) or {key}=<a writable folder>")


def fail(message: str) -> None:
    import sys

    print(f"Error: {message}", file=sys.stderr)
    sys.exit(1)


# --- applications declare their data ----------------------------------------------------------------
# Each configs/model/<name>.yaml says which data configs it runs on (`runs_on: [digits, mnist]`, the first
# bundled one is what quick checks train on). The key is the application's declaration, not a
# hyperparameter: `module_config` drops it before the LightningModule is instantiated.
RUNS_ON = "runs_on"


def module_config(model):
    """The model node without the `runs_on` declaration: what `instantiate` passes to the module."""
    from omegaconf import DictConfig, open_dict

    if not isinstance(model, DictConfig) or RUNS_ON not in model:
        return model
    node = model.copy()
    with open_dict(node):
        del node[RUNS_ON]
    return node


def model_options() -> list[str]:
    """Every model config of configs/model/ (a new yaml there is picked up without any list to edit)."""
    return sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


def data_options() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))


def declared_data(model: str) -> list[str]:
    """The data configs configs/model/<model>.yaml declares (`runs_on`, inherited through its defaults);
    composed by Hydra alone (nothing resolved, nothing instantiated)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        node = compose(overrides=[f"+model={model}"]).model
    GlobalHydra.instance().clear()
    return [str(d) for d in node.get(RUNS_ON) or []]


def model_data_pairs() -> list[tuple[str, str]]:
    """(model, data) for every model config and every data config it declares."""
    return [(model, data) for model in model_options() for data in declared_data(model)]
