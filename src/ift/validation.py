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
    check_threads(cfg.get("threads", "auto"))
    check_trainer_values(cfg.trainer)
    check_devices(cfg.trainer)
    check_runs_on(cfg.model)
    check_model_fits_data(cfg.model, cfg.data)
    check_data_root(cfg.data)
    check_ckpt_file(cfg.get("ckpt_path"))


# Trainer integers: the smallest value Lightning accepts, and whether null (Lightning's default) is allowed.
TRAINER_INTS = {"max_epochs": (-1, True), "min_epochs": (0, True), "max_steps": (-1, False),
                "check_val_every_n_epoch": (1, True), "log_every_n_steps": (1, True),
                "accumulate_grad_batches": (1, False), "num_sanity_val_steps": (-1, True)}
# Batch counts: an int (that many), a float in [0, 1] (that fraction) or null (all).
TRAINER_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                  "overfit_batches", "val_check_interval")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_trainer_values(trainer: DictConfig) -> None:
    """The Trainer's numeric options, checked by name (Lightning answers `max_epochs=abc` with a bare
    AssertionError from deep inside its fit loop)."""
    for key, (low, nullable) in TRAINER_INTS.items():
        value = trainer.get(key)
        if (value is None and not nullable) or (value is not None and not (is_int(value) and value >= low)):
            null = " (or null)" if nullable else ""
            raise ConfigError(f"trainer.{key} must be an integer >= {low}{null}, got {value!r}")
    for key in TRAINER_LIMITS:
        value = trainer.get(key)
        ok = value is None or (is_int(value) and value >= 0) or (isinstance(value, float) and 0.0 <= value <= 1.0)
        if not ok:
            raise ConfigError(f"trainer.{key} must be a batch count (int >= 0), a fraction in [0, 1] or null, "
                              f"got {value!r}")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0):
        raise ConfigError(f"trainer.gradient_clip_val must be a number >= 0 or null, got {clip!r}")


def check_threads(threads) -> None:
    if threads != "auto" and not (is_int(threads) and threads >= 1):
        raise ConfigError(f"threads must be `auto` or an integer >= 1 (torch CPU threads), got {threads!r}")


def check_runs_on(model: DictConfig) -> None:
    """`model.runs_on`, the model config's declaration of the data configs it trains on (see
    ift.config.RUNS_ON): a list of names of configs/data/*.yaml."""
    from ift.config import RUNS_ON, data_options

    declared = model.get(RUNS_ON)
    if declared is None:
        return  # a run config written before the declaration existed
    names = data_options()
    if isinstance(declared, str) or not all(isinstance(d, str) for d in declared) or not declared:
        raise ConfigError(f"model.{RUNS_ON} must be a non-empty list of data config names ({', '.join(names)}), "
                          f"got {declared!r}")
    unknown = [d for d in declared if d not in names]
    if unknown:
        raise ConfigError(f"model.{RUNS_ON} names data config {unknown[0]!r}, which configs/data/ does not have; "
                          f"use some of: {', '.join(names)}")


# Models that learn from few-shot tasks (x_support, y_support, x_query, y_query), and the data modules
# that yield them; every other pair is an image/label model on (x, y) batches.
TASK_MODELS = ("ift.imaml.module.MetaRegression",)
TASK_DATA = ("ift.data.sinusoid.SinusoidDataModule",)


def check_model_fits_data(model: DictConfig, data: DictConfig) -> None:
    model_target, data_target = str(model._target_), str(data._target_)
    if model_target in TASK_MODELS and data_target not in TASK_DATA:
        raise ConfigError(f"{chosen('model', model_target)} meta-learns from few-shot regression tasks: it needs "
                          f"data=sinusoid, got {chosen('data', data_target)}")
    if data_target in TASK_DATA and model_target not in TASK_MODELS:
        raise ConfigError(f"data=sinusoid yields few-shot regression tasks, not images: use model=imaml or "
                          f"model=maml, got {chosen('model', model_target)}")


def chosen(group: str, target: str) -> str:
    """`model=imaml (ift.imaml.module.MetaRegression)`: the option picked on the command line where
    Hydra recorded it, and the class."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return f"{group}={HydraConfig.get().runtime.choices[group]} ({target})"
    except Exception:  # composed without Hydra's runtime record
        return f"{group} {target}"


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


# --- eval options: one node per application ---------------------------------------------------------
# Each application's eval options are a node of configs/eval.yaml's `eval` with an `enabled` switch
# (eval.saliency.*). The flat keys of before (eval.saliency_<field>, eval.saliency=true) get one line
# naming the new key; no application is named here: the nodes are read from eval.yaml.


def eval_nodes() -> list[str]:
    """The per-application nodes of `eval` in configs/eval.yaml."""
    from omegaconf import OmegaConf

    from ift.config import CONFIG_DIR

    defaults = OmegaConf.load(CONFIG_DIR / "eval.yaml").get("eval") or {}
    return [str(k) for k, v in defaults.items() if isinstance(v, DictConfig)]


def check_eval_keys(eval_cfg) -> None:
    """A flat eval key of a node's options (`eval.<node>_<field>`, or `eval.<node>=<value>` in place of
    the node) is one line naming its new key."""
    from collections.abc import Mapping

    nodes = eval_nodes()
    for key in eval_cfg or {}:
        app = next((n for n in nodes if str(key).startswith(f"{n}_")), None)
        if app is not None:
            raise ConfigError(f"eval.{key} was renamed eval.{app}.{str(key)[len(app) + 1:]} (each application's eval "
                              f"options sit in its own node); rename it in your command or config")
    for app in nodes:
        value = (eval_cfg or {}).get(app)
        if value is not None and not isinstance(value, Mapping):
            value = str(value).lower() if isinstance(value, bool) else value
            raise ConfigError(f"eval.{app}={value} was renamed eval.{app}.enabled={value} (eval.{app} is the node of "
                              f"its options)")


def check_eval_overrides(overrides: list[str]) -> None:
    """The same on eval.py's command line, before Hydra composes (Hydra itself would answer a moved key
    with its multi-line `Could not override`)."""
    for arg in overrides:
        key = arg.split("=", 1)[0].lstrip("+~")
        if key.startswith("eval."):
            check_eval_keys({key[len("eval."):]: None})
