"""When a run stops: after a signal, at the time limit, at max_steps; and the signal handlers
that let SIGINT/SIGTERM finish the current step first."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch

from transformer.config import TrainerConfig
from transformer.errors import UserError
from transformer.train.distributed import Dist, highest

log = logging.getLogger(__name__)
STOPS = ("", "steps", "time", "signal")  # the answers of stop_reason, mildest first


def stop_reason(t: TrainerConfig, step: int, elapsed: float, signalled: bool, dist: Dist, device: torch.device) -> str:
    """Why to stop after ``step``, ``elapsed`` seconds into training ("" to go on). Under DDP
    every rank gets the same answer, since a signal or the clock may reach them apart."""
    if signalled:
        reason = "signal"
    elif t.max_minutes and elapsed / 60 >= t.max_minutes:
        reason = "time"
    else:
        reason = "steps" if step >= t.max_steps else ""
    reason = STOPS[highest(STOPS.index(reason), dist, device)]
    if reason == "time":
        log.info("trainer.max_minutes=%s reached", t.max_minutes)
    return reason


def patience_spent(patience: int, progress: Any) -> bool:
    """Early stopping: ``patience`` > 0 evaluations in a row without a better validation BLEU."""
    if patience <= 0 or progress.evals_without_gain < patience:
        return False
    note = "early stop: no better validation BLEU in %d evaluations (best %.2f at step %d)"
    log.info(note, patience, progress.best_bleu, progress.best_step)
    return True


@contextlib.contextmanager
def catch_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """SIGINT/SIGTERM call ``on_signal`` (the loop stops after the step); a second one acts at once."""

    def handler(signum, frame):
        on_signal(signum)
        signal.signal(signum, previous[signum] or signal.SIG_DFL)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class BadSteps:
    """Non-finite updates in a row: each is skipped with a warning; ``trainer.max_bad_steps``
    of them stop the run (the caller saves the weights from before the problem first)."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0

    def finite(self, stats: dict, step: int, precision: str) -> bool:
        """Whether update ``step`` counts (fp16's scaler skips overflows on its own)."""
        if stats["finite"] or precision == "fp16" and math.isfinite(stats["loss"]):
            self.count = 0
            return True
        self.count += 1
        log.warning(
            "step %d: non-finite loss or gradient (loss %s, grad norm %s): update skipped",
            *(step, stats["loss"], stats["grad_norm"]),
        )
        return False

    def error(self, step: int, last: Any) -> UserError | None:
        """The error that stops the run once the limit is reached, else None."""
        if self.count < self.limit:
            return None
        return UserError(
            f"{self.count} consecutive non-finite steps after step {step}: stopped; weights from before "
            f"the problem are in {last} (lower trainer.lr, or use fp32/bf16)"
        )
