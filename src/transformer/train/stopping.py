"""When a run stops: after a signal, at the time limit, at max_steps; and the signal handlers
that let SIGINT/SIGTERM finish the current step first."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from typing import Any, Callable, Iterator

import torch

from transformer.train.distributed import Dist, highest

log = logging.getLogger(__name__)
STOPS = ("", "steps", "time", "signal")  # the answers of stop_reason, mildest first


def stop_reason(t: Any, step: int, start: float, signalled: bool, dist: Dist, device: torch.device) -> str:
    """Why to stop after ``step`` ("" to go on). Under DDP every rank gets the same answer,
    since a signal or the clock may reach them apart."""
    if signalled:
        reason = "signal"
    elif t.max_minutes and (time.time() - start) / 60 >= t.max_minutes:
        reason = "time"
    else:
        reason = "steps" if step >= t.max_steps else ""
    reason = STOPS[highest(STOPS.index(reason), dist, device)]
    if reason == "time":
        log.info("trainer.max_minutes=%s reached", t.max_minutes)
    return reason


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
