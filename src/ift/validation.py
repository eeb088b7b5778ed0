"""Config checks that need no heavy imports (train.py runs them before importing torch and
Lightning, so these mistakes are reported within about a second): one clear line per mistake."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ift.errors import ConfigError


def validate_config(cfg: DictConfig) -> None:
    for key in ("data", "model", "trainer"):
        if cfg.get(key) is None or "_target_" not in cfg[key]:
            raise ConfigError(f"config group `{key}` is missing or has no _target_; pick one, e.g. {key}=<name>")
    if cfg.get("seed") is not None and not isinstance(cfg.seed, int):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")
    batch_size = cfg.data.get("batch_size")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"data.batch_size must be a positive integer, got {batch_size!r}")
    lr = cfg.model.get("lr")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"model.lr must be > 0, got {lr!r}")
    check_devices(cfg.trainer)
    check_data_root(cfg.data)
    check_ckpt_file(cfg.get("ckpt_path"))


def check_devices(trainer: DictConfig) -> None:
    """DDP needs explicit counts: SLURM runs one task per device, and each rank must agree."""
    if "ddp" not in str(trainer.get("strategy", "")):
        return
    for key in ("devices", "num_nodes"):
        value = trainer.get(key, 1)
        if not (isinstance(value, int) and value > 0):
            raise ConfigError(f"trainer.{key} must be an explicit positive count with trainer.strategy=ddp, got "
                              f"{value!r}; e.g. trainer=ddp trainer.devices=4 (GPUs per node) trainer.num_nodes=1")


def check_ckpt_file(ckpt_path) -> None:
    """An explicit ckpt_path must be a file in torch.save's zip format (Lightning writes no other);
    `last` is resolved later, among the checkpoints that load."""
    import zipfile

    if ckpt_path is None or str(ckpt_path) == "last":
        return
    path = Path(str(ckpt_path))
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path} does not exist; expected a file like logs/train/runs/<run>/checkpoints/last.ckpt "
            f"(or ckpt_path=last for the newest one)")
    if not zipfile.is_zipfile(path):
        raise ConfigError(
            f"cannot read checkpoint {path}: it is truncated, corrupted or not a PyTorch checkpoint (not a zip "
            f"archive); pass ckpt_path=<run>/checkpoints/last.ckpt of a finished save")


def check_data_root(data: DictConfig) -> None:
    """A file-backed dataset whose `root` folder does not exist (and no download asked for) cannot
    load; which files must be inside is the data module's business (it names them when missing)."""
    root = data.get("root")
    if root is None or data.get("download", False) or Path(str(root)).is_dir():
        return
    name = str(data._target_).rsplit(".", 1)[-1]
    raise ConfigError(
        f"data.root={root} is not a folder ({name}); pass data.root=<folder with the dataset files> "
        f"(see docs/data.md for the layout), data.download=true with network, or data=digits (bundled)")
