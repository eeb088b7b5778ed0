"""Shared fixtures: composing the real Hydra configs and running the real entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict

import ift.config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ift.config.CONFIG_DIR
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def compose_config(config_name: str, overrides: list[str], run_dir: Path) -> DictConfig:
    cfg = ift.config.compose_config(config_name, overrides, run_dir)
    with open_dict(cfg):
        cfg.paths.log_dir = str(run_dir.parent / "logs")
    return cfg


def run_script(script: str, args: list[str], cwd: Path = ROOT, timeout: int = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run train.py / eval.py in a fresh interpreter, the way a user does."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def compose_train(tmp_path):
    def _compose(*overrides: str) -> DictConfig:
        return compose_config("train", list(overrides), tmp_path / "run")
    return _compose
