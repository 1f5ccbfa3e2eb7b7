"""Shared fixtures: composed configs, one trained tiny run, and a console-script runner.

Tests stay offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE) and use one CPU thread.

Fixtures
--------
``compose_cfg(config_name="train", overrides=())``
    A fresh ``DictConfig`` composed with Hydra's compose API from the packaged configs,
    exactly as the console scripts would see it (schemas registered first).
``tiny_cfg``
    ``compose_cfg("train", ["experiment=tiny"])`` with ``run_dir`` set to an empty
    temporary directory; function-scoped, so a test may change it freely.
``tiny_run``
    Session-scoped ``Path`` of one run trained in-process with ``experiment=tiny`` (a few
    seconds): ``<run>/checkpoints/best.pt`` (also last.pt), ``<run>/spm.model``,
    ``metrics.jsonl``, ``results.json``. Shared by every test: treat it as read-only.
``cli(name, *args, cwd=..., input=None)``
    Runs the console script ``transformer-<name>`` in a subprocess (offline, one thread)
    and returns the ``CompletedProcess`` with text stdout/stderr. Each call costs ~3 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from transformer.config import config_dir, register_configs

torch.set_num_threads(1)

ComposeFn = Callable[..., DictConfig]
CliFn = Callable[..., subprocess.CompletedProcess]


def compose_config(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``config_name`` from the packaged configs with command-line style overrides."""
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


@pytest.fixture
def compose_cfg() -> ComposeFn:
    return compose_config


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> DictConfig:
    cfg = compose_config("train", ["experiment=tiny"])
    cfg.run_dir = str(tmp_path / "run")
    return cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformer.evaluate import train_and_test as train

    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    cfg = compose_config("train", ["experiment=tiny", f"run_dir={run_dir}"])
    # train() installs SIGINT/SIGTERM handlers for graceful stops; give Ctrl-C back to pytest.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        train(cfg)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return run_dir


def run_console_script(
    name: str, *args: str, cwd: Path, input: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """``transformer-<name> args...`` from the venv that runs the tests."""
    script = Path(sys.executable).parent / f"transformer-{name}"
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(script), *args],
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def cli() -> CliFn:
    return run_console_script
