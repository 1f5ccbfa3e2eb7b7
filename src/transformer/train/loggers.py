"""Metric loggers: where a run's records go, chosen by name with ``trainer.loggers``.

A logger is a ``MetricLogger`` subclass built with the run's ``RunInfo``; it gets every
record (``log``), the validation translations (``text``), each optimizer update
(``advance``, for a progress bar) and ``close`` at the end. The built-in ones: ``jsonl``
(metrics.jsonl), ``tensorboard`` (``<run>/tb``), ``console`` (the progress bar, or a log
line), and behind extras ``wandb`` and ``mlflow`` (trackers.py). A logger of your own is
found by name in ``LOGGERS``: call ``register_logger`` before training (Python API), or
declare an entry point in the group ``transformer.loggers`` (the console scripts find it
once the package that declares it is installed).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from transformer.errors import UserError, first_line
from transformer.rundir import append_record, truncate_records

log = logging.getLogger(__name__)
PLAIN = ("step", "epoch", "minutes")  # record fields that are coordinates, not scalars to plot
ENTRY_POINTS = "transformer.loggers"  # the entry point group of loggers from other packages


@dataclass(frozen=True)
class RunInfo:
    """What a logger is built with: the run, and where it stands."""

    run_dir: Path
    resumed_at: int | None = None  # the step a resumed run continues from (later records are dropped); None: fresh
    total_steps: int = 0  # updates planned (a time budget may revise it: MetricLogger.replan)
    bar: bool = False  # trainer.progress: a progress bar rather than log lines
    config: dict[str, Any] = field(default_factory=dict)  # the run's config as plain data (trackers keep it)


class MetricLogger:
    """Where records go. A record is a flat dict holding ``step`` and the metrics of one
    moment of the run (see rundir.py: training, validation, the settings a resume changed);
    treat it as read-only. Subclasses are built as ``cls(run: RunInfo)`` on rank 0 only; the
    hooks other than ``log`` do nothing unless overridden."""

    requires: tuple[str, ...] = ()  # modules that must be importable (checked before any work)
    install = ""  # how to install them, for that error (default: pip install <the first missing module>)

    def log(self, group: str, record: dict[str, Any], step: int) -> None:
        """One record of ``group`` (train, valid or resume) at update ``step``: the one method to write."""
        raise NotImplementedError

    def text(self, tag: str, text: str, step: int) -> None:
        """Free text at ``step`` (``valid/translations``: the first validation translations)."""

    def advance(self) -> None:
        """One optimizer update done."""

    def replan(self, total_steps: int) -> None:
        """The run now plans ``total_steps`` updates (the time budget revised its plan)."""

    def close(self) -> None:
        """The run has ended: flush and release what the logger holds."""


def scalars(group: str, record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers to plot, named ``group/key`` (a ``group_`` prefix is dropped:
    valid_bleu -> valid/bleu); coordinates (step, epoch, minutes) and non-numbers are left out."""
    return {
        f"{group}/{key.removeprefix(group + '_')}": value
        for key, value in record.items()
        if key not in PLAIN and isinstance(value, int | float) and not isinstance(value, bool)
    }


class JsonlLogger(MetricLogger):
    """metrics.jsonl: one JSON record a line, appended; a resumed run first drops the records
    written after its checkpoint's step (rundir.truncate_records, an atomic rewrite)."""

    def __init__(self, run: RunInfo):
        self.run_dir = run.run_dir
        if run.resumed_at is not None:
            truncate_records(run.run_dir, run.resumed_at)

    def log(self, group: str, record: dict[str, Any], step: int) -> None:
        append_record(self.run_dir, record)


class TensorBoardLogger(MetricLogger):
    """TensorBoard events in ``<run>/tb``; a resumed run purges the events after its step."""

    def __init__(self, run: RunInfo):
        from torch.utils.tensorboard import SummaryWriter

        purge = run.resumed_at + 1 if run.resumed_at is not None else None
        self.writer = SummaryWriter(str(run.run_dir / "tb"), purge_step=purge)

    def log(self, group: str, record: dict[str, Any], step: int) -> None:
        for name, value in scalars(group, record).items():
            self.writer.add_scalar(name, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.close()


class ConsoleLogger(MetricLogger):
    """Training records on a tqdm progress bar (trainer.progress), or as a log line without one."""

    def __init__(self, run: RunInfo):
        self.bar = None
        if run.bar:
            from tqdm import tqdm

            self.bar = tqdm(total=run.total_steps, initial=run.resumed_at or 0, desc="train", dynamic_ncols=True)

    def log(self, group: str, record: dict[str, Any], step: int) -> None:
        if group != "train":
            return
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", lr=f"{record['lr']:.2e}"
            )
            return
        log.info(
            "step %d loss %.4f nll %.4f lr %.2e gnorm %.2f %.0f tok/s",
            *(step, record["loss"], record["nll"], record["lr"], record["grad_norm"], record["tokens_per_s"]),
        )

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def replan(self, total_steps: int) -> None:
        if self.bar is not None:
            self.bar.total = total_steps
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# name -> class, or "module:Class" imported when chosen (the trackers' clients are optional extras)
LOGGERS: dict[str, type[MetricLogger] | str] = {
    "jsonl": JsonlLogger,
    "tensorboard": TensorBoardLogger,
    "console": ConsoleLogger,
    "wandb": "transformer.train.trackers:WandbLogger",
    "mlflow": "transformer.train.trackers:MlflowLogger",
}


def register_logger(name: str, cls: type[MetricLogger]) -> type[MetricLogger]:
    """Make ``cls`` the logger that ``trainer.loggers=[..., name]`` chooses (a built-in name
    is replaced); returns ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, MetricLogger)):
        raise TypeError(f"logger {name!r}: {cls!r} is not a MetricLogger subclass")
    LOGGERS[name] = cls
    return cls


def logger_class(name: str) -> type[MetricLogger]:
    """The logger registered as ``name``, else the entry point of that name; a UserError naming
    trainer.loggers for an unknown name or a client library that is not installed."""
    found: Any = LOGGERS.get(name)
    points = entry_points(group=ENTRY_POINTS, name=name) if found is None else ()
    if found is None and not points:
        known = sorted(set(LOGGERS) | set(entry_points(group=ENTRY_POINTS).names))
        raise UserError(f"trainer.loggers: no logger named {name!r}; known: {', '.join(known)}")
    try:
        if points:
            found = next(iter(points)).load()
        elif isinstance(found, str):
            module, _, attr = found.partition(":")
            found = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise UserError(f"trainer.loggers: {name} cannot be imported ({first_line(e)})") from None
    if not (isinstance(found, type) and issubclass(found, MetricLogger)):
        raise UserError(f"trainer.loggers: {name!r} is {found!r}, not a MetricLogger subclass")
    if missing := [m for m in found.requires if find_spec(m) is None]:
        how = found.install or f"pip install {missing[0]}"
        raise UserError(f"trainer.loggers: {name} needs the {missing[0]} package ({how})")
    return found


def logger_classes(names: Sequence[str]) -> list[type[MetricLogger]]:
    """The classes of ``trainer.loggers``, looked up when training starts, before any work."""
    if len(set(names)) != len(names):
        raise UserError(f"trainer.loggers={list(names)}: a logger is named twice")
    return [logger_class(name) for name in names]
