"""The loop's one metric sink: ``RunLog`` hands every record to the loggers that
``trainer.loggers`` chose (loggers.py); only rank 0 builds any."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformer.rundir import TRAIN_KEYS
from transformer.train.loggers import MetricLogger, RunInfo


def train_record(step: int, epoch: int, elapsed: float, stats: dict, peak_mem_mb: float | None) -> dict:
    """The metrics.jsonl record of a training log line."""
    record = {"step": step, "epoch": epoch, "minutes": round(elapsed / 60, 3), **{k: stats[k] for k in TRAIN_KEYS}}
    if peak_mem_mb is not None:
        record["peak_mem_mb"] = peak_mem_mb
    return record


class RunLog:
    """The chosen loggers, built in order when ``enabled`` (rank 0), each given every call."""

    def __init__(self, loggers: Sequence[type[MetricLogger]], run: RunInfo, *, enabled: bool):
        self.loggers: list[MetricLogger] = []
        try:
            for cls in loggers if enabled else ():
                self.loggers.append(cls(run))
        except BaseException:
            self.close()  # those built already (a bar, an event file) are released
            raise

    def log(self, group: str, record: dict[str, Any], text: str | None = None) -> None:
        """``record`` (it holds its ``step``) to every logger; ``text``: the group's translations."""
        for logger in self.loggers:
            logger.log(group, record, record["step"])
            if text is not None:
                logger.text(f"{group}/translations", text, record["step"])

    def advance(self) -> None:
        """One optimizer update done."""
        for logger in self.loggers:
            logger.advance()

    def replan(self, total: int) -> None:
        """A new planned number of updates (the time budget revised its plan)."""
        for logger in self.loggers:
            logger.replan(total)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []
