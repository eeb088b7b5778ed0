"""W&B without surprises: offline unless asked, never a prompt, never a hang, one run across resumes.

`WandbLogger` decides the mode once, right before `wandb.init`, and always passes it to
`wandb.init` explicitly (W&B reads `WANDB_MODE` only once per process, so changing the environment
later does nothing):

- offline unless online was asked for (`logger.wandb.offline=false` or `WANDB_MODE=online`);
- online without credentials (no `WANDB_API_KEY`, no `wandb login`): offline, one warning;
  W&B's interactive login menu is never shown and nothing reads stdin;
- online with credentials, but the server gives no answer within `online_timeout_s` (or
  `wandb.init` fails online for any reason): offline, one warning.

An offline run is uploaded later with `wandb sync <run>/wandb/offline-run-*`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.wandb.ai"
OFFLINE_HINT = "logging offline; upload later with `wandb sync <run>/wandb/offline-run-*`"


def has_wandb_credentials() -> bool:
    """An API key from the environment, `wandb login` (netrc) or W&B's settings; never prompts."""
    import wandb

    try:
        return bool(wandb.login(prompt=False, verify=False))
    except Exception:  # a malformed key or settings file: treat as not logged in
        return False


def wandb_base_url() -> str:
    """The server W&B will talk to: WANDB_BASE_URL, else `wandb login --host`'s, else the cloud."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"]
    try:
        import wandb

        return str(wandb.setup().settings.base_url or DEFAULT_BASE_URL)
    except Exception:
        return DEFAULT_BASE_URL


def server_unreachable(url: str, timeout_s: float) -> str | None:
    """None if `url` answers an HTTP request within `timeout_s` (any status code counts: the server
    is there), else the reason. Runs in a daemon thread so that a slow DNS lookup cannot exceed the
    bound either; proxies from the environment are honoured as W&B honours them."""
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(url, timeout=timeout_s).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)
        except Exception as err:  # refused, DNS failure, TLS error, timeout
            reason = getattr(err, "reason", err)
            outcome.append(f"{type(reason).__name__}: {reason}")

    thread = threading.Thread(target=probe, name="wandb-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"no answer within {timeout_s:g} s"


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger with the mode policy of this module.

    Args:
        offline: log offline (the default in configs/logger/wandb.yaml).
        online_timeout_s: longest wait for the W&B server before falling back to offline; it also
            bounds `wandb.init`'s own wait (`init_timeout`).
        flush_every_s: how often the run's `.wandb` file is written: a run killed with SIGKILL loses
            the metrics of at most its last `flush_every_s` seconds (the CSV log keeps them).
        Others: as Lightning's `WandbLogger` (and `wandb.init`).
    """

    def __init__(self, *args: Any, offline: bool = True, online_timeout_s: float = 15.0,
                 flush_every_s: float = 0.5, **kwargs: Any) -> None:
        for key, value in (("online_timeout_s", online_timeout_s), ("flush_every_s", flush_every_s)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"logger.wandb.{key} must be > 0 seconds, got {value!r}")
        super().__init__(*args, offline=offline, **kwargs)
        self.online_timeout_s = float(online_timeout_s)
        self.flush_every_s = float(flush_every_s)
        # Lightning always passes `anonymous`; W&B warns that the setting has no effect.
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:
            self._start_run()
        return self._experiment

    def _choose_mode(self) -> str:
        if os.environ.get("WANDB_MODE", "").lower() == "disabled":
            return "disabled"
        if self._offline:
            return "offline"
        if not has_wandb_credentials():
            log.warning("W&B online mode asked for but no credentials (WANDB_API_KEY or `wandb login`): %s",
                        OFFLINE_HINT)
            return "offline"
        url = wandb_base_url()
        reason = server_unreachable(url, self.online_timeout_s)
        if reason is not None:
            log.warning("W&B server %s unreachable (%s; logger.wandb.online_timeout_s=%g): %s",
                        url, reason, self.online_timeout_s, OFFLINE_HINT)
            return "offline"
        return "online"

    def _start_run(self) -> None:
        mode = self._choose_mode()
        self._offline = mode != "online"
        self._wandb_init["mode"] = mode
        self._wandb_init["settings"] = self._settings(mode)
        try:
            self._init_run()
        except Exception as err:
            if mode != "online":
                raise
            import wandb

            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            log.warning("W&B online run could not start (%s: %s): %s", type(err).__name__, first, OFFLINE_HINT)
            wandb.finish()
            self._experiment, self._offline = None, True
            self._wandb_init["mode"] = "offline"
            self._wandb_init["settings"] = self._settings("offline")
            self._init_run()

    def _settings(self, mode: str) -> dict[str, Any]:
        import wandb

        settings = dict(self._wandb_init.get("settings") or {})
        if mode == "online":
            settings.setdefault("init_timeout", self.online_timeout_s)
        # wandb-core writes the run file every 15 s by default: a killed run would lose up to 15 s of
        # metrics that the CSV log (written on every logging call) kept.
        if "x_transaction_log_flush_interval" in getattr(wandb.Settings, "model_fields", {}):
            settings.setdefault("x_transaction_log_flush_interval", self.flush_every_s)
        return settings

    def _init_run(self) -> None:
        # Lightning's offline switch rewrites WANDB_MODE, which W&B then warns about (it reads the
        # environment once per process); the mode is already in the init arguments.
        offline, self._offline = self._offline, False
        try:
            self._experiment = LightningWandbLogger.experiment.fget(self)
        finally:
            self._offline = offline


def prepare_wandb(cfg: DictConfig, resumed_run_dir: Path | None = None) -> None:
    """Resuming from a checkpoint of a run that logged to W&B continues that W&B run (same id)."""
    node = (cfg.get("logger") or {}).get("wandb")
    id_file = resumed_run_dir / "wandb_id.txt" if resumed_run_dir else None
    if node is None or node.get("id") is not None or id_file is None or not id_file.is_file():
        return
    with open_dict(node):
        node.id = id_file.read_text().strip()
        node.resume = "allow"
    log.info("Resuming W&B run %s", node.id)


def finish_wandb(loggers: list[Logger]) -> None:
    """Always close the W&B run (also after an exception) so its files are complete.

    wandb-core does not write `files/wandb-summary.json` for offline runs; we write it, so the
    final metrics of an offline run can be read without syncing.
    """
    if any(isinstance(lg, LightningWandbLogger) for lg in loggers):
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
