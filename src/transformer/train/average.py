"""transformer-average: one checkpoint whose weights are the mean of several.

Averaging the last few checkpoints of a run usually gains a little BLEU for free
(Vaswani et al. 2017 averaged the last 5 or 20). Usage::

    transformer-average inputs=runs/x output=runs/x/checkpoints/avg5.pt last=5
    transformer-average 'inputs=[a.pt,b.pt,c.pt]' output=avg.pt

A run directory stands for its step checkpoints (``checkpoints/step_*.pt``, oldest first);
``last=N`` keeps the newest N of all the inputs. The result decodes and evaluates like any
checkpoint (its tokenizer, model config and other fields are the oldest input's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from transformer.checkpoint import CHECKPOINT_DIR, atomic_save, average_checkpoints, list_step_checkpoints
from transformer.errors import UserError

log = logging.getLogger(__name__)

USAGE = "usage: transformer-average inputs=RUN_DIR|CHECKPOINT|[A.pt,B.pt,...] output=FILE [last=N]"


@dataclass
class AverageConfig:
    inputs: list[str] = field(default_factory=list)  # run directories (their step_*.pt) and checkpoint files
    output: str = ""  # where to write the averaged checkpoint
    last: int | None = None  # average only the newest N (>= 1) of the inputs (unset: all)


def checkpoints_to_average(inputs: list[str], last: int | None = None) -> list[Path]:
    """Checkpoint files named by ``inputs``, run directories expanded to their step
    checkpoints; the newest ``last`` when ``last`` > 0."""
    paths: list[Path] = []
    for name in inputs:
        p = Path(name).expanduser()
        if p.is_dir():
            found = list_step_checkpoints(p / CHECKPOINT_DIR if (p / CHECKPOINT_DIR).is_dir() else p)
            if not found:
                raise UserError(f"{p}: no step_*.pt checkpoints to average")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise UserError(f"{p}: no such checkpoint file or run directory")
    if last is not None and last < 1:
        raise UserError(f"last={last} must be >= 1 (the newest N checkpoints; leave it out to average all)")
    return paths[-last:] if last else paths


def average(cfg: AverageConfig) -> None:
    if not cfg.inputs or not cfg.output:
        raise UserError(f"inputs and output are required ({USAGE})")
    paths = checkpoints_to_average(cfg.inputs, cfg.last)
    atomic_save(average_checkpoints(paths), Path(cfg.output).expanduser())
    log.info("averaged %d checkpoints into %s: %s", len(paths), cfg.output, ", ".join(str(p) for p in paths))
