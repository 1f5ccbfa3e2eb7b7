"""Experiment trackers as metric loggers: Weights & Biases (``trainer.loggers=[...,wandb]``,
``pip install 'transformer[wandb]'``) and MLflow (``mlflow``, ``pip install 'transformer[mlflow]'``).

Each is configured the way its library is, by environment variables (W&B: ``WANDB_PROJECT``,
``WANDB_MODE=offline``, ``WANDB_DIR``; MLflow: ``MLFLOW_TRACKING_URI``,
``MLFLOW_EXPERIMENT_NAME``), logs the scalars of every record as ``group/key`` (as
TensorBoard does) and the run's config once. A resumed run continues the same tracker run:
its id is kept in the run directory (``TRACKER_IDS``).
"""

from __future__ import annotations

import html
import os
import time
from pathlib import Path
from typing import Any

from transformer.errors import UserError, first_line
from transformer.rundir import atomic_write
from transformer.train.loggers import MetricLogger, RunInfo, scalars
from transformer.train.resume import flatten

TRACKER_IDS = {"wandb": "wandb.id", "mlflow": "mlflow.id"}  # run-directory files: each tracker's run id
PROJECT = "transformer"  # the W&B project and MLflow experiment when the environment names none


def run_id(run: RunInfo, tracker: str) -> str | None:
    """The tracker's run id a resumed run continues (None: a fresh run, or none was kept)."""
    path = run.run_dir / TRACKER_IDS[tracker]
    if run.resumed_at is None or not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip() or None


def keep_run_id(run_dir: Path, tracker: str, value: str) -> None:
    atomic_write(run_dir / TRACKER_IDS[tracker], value + "\n")


class WandbLogger(MetricLogger):
    """A W&B run named after the run directory, its files under ``<run>/wandb`` (unless
    WANDB_DIR says otherwise); the validation translations as HTML."""

    requires = ("wandb",)
    install = "pip install 'transformer[wandb]'"

    def __init__(self, run: RunInfo):
        import wandb

        self.wandb = wandb
        previous = run_id(run, "wandb")
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", PROJECT),
                name=run.run_dir.name,
                id=previous,
                resume="allow" if previous else None,
                dir=os.environ.get("WANDB_DIR", str(run.run_dir)),
                config=run.config,
            )
        except Exception as e:
            raise UserError(f"trainer.loggers: wandb could not start a run ({first_line(e)})") from None
        keep_run_id(run.run_dir, "wandb", self.run.id)

    def log(self, group: str, record: dict[str, Any], step: int) -> None:
        if values := scalars(group, record):
            self.run.log(values, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowLogger(MetricLogger):
    """An MLflow run named after the run directory in the experiment MLFLOW_EXPERIMENT_NAME;
    the config as parameters (dotted keys), texts as artifacts ``<tag>/step_NNNNNNNN.txt``."""

    requires = ("mlflow",)
    install = "pip install 'transformer[mlflow]'"

    def __init__(self, run: RunInfo):
        from mlflow.tracking import MlflowClient

        try:
            self.client = MlflowClient()  # MLFLOW_TRACKING_URI: a server, sqlite:, or file: (mlflow-skinny)
            self.run_id = run_id(run, "mlflow") or self.start(run)
            self.client.update_run(self.run_id, status="RUNNING")
        except Exception as e:
            raise UserError(f"trainer.loggers: mlflow could not start a run ({first_line(e)})") from None
        keep_run_id(run.run_dir, "mlflow", self.run_id)

    def start(self, run: RunInfo) -> str:
        """A new run with the config as its parameters; its id."""
        from mlflow.entities import Param

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        started = self.client.create_run(experiment_id, run_name=run.run_dir.name).info.run_id
        params = [Param(key, str(value)) for key, value in flatten(run.config).items()]
        self.client.log_batch(started, params=params)
        return started

    def log(self, group: str, record: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in scalars(group, record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{tag}/step_{step:08d}.txt")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
