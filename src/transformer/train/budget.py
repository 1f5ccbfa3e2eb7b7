"""``trainer.time_budget_minutes``: the whole run in a wall-clock budget on whatever machine.

The recipe's schedule (``max_steps`` updates, warmup, evaluations and checkpoints at fixed
steps) is the reference; the run times a few throwaway updates, one validation and a
sample of the test search at start-up, then scales every step count by the same factor so
that BPE, training, evaluations and the final test scoring end inside the budget. The
plan is stored in the checkpoints, so a resumed run keeps it (and stays exact); training
also stops at the plan's ``max_minutes`` should the machine slow down later.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from transformer.errors import UserError

clock = time.monotonic  # tests replace it with a fake clock
MARGIN = 0.04  # share of the budget kept free for what the timings miss (saves, logging, start-up)
EVAL_SHARE = 0.05  # at most this share of the budget goes to validation; fewer evaluations beyond it
MAX_WARMUP_SHARE = 0.25  # a shortened schedule warms up over at most this share of its updates


@dataclass
class Costs:
    """Seconds, measured on this machine at start-up."""

    spent: float  # since the run began: reading, BPE, encoding, these timings
    step: float  # one optimizer update
    evaluation: float  # one validation (loss and BLEU)
    test: float  # the final test scoring


@dataclass
class Plan:
    """Trainer settings fixed by the budget; applied over the config's."""

    max_steps: int
    warmup_steps: int
    eval_every: int
    save_every: int
    max_minutes: float  # training time (evaluations included) after which the run stops anyway

    def to_dict(self) -> dict:
        return asdict(self)


def plan_schedule(t: Any, budget_minutes: float, costs: Costs) -> Plan:
    """Scale ``t``'s schedule (a TrainerConfig) to ``budget_minutes`` given ``costs``."""
    if budget_minutes < 0:
        raise UserError(f"trainer.time_budget_minutes={budget_minutes} must be >= 0 (0: off)")
    budget = budget_minutes * 60 * (1 - MARGIN)
    training = budget - costs.spent - costs.test  # updates plus evaluations
    if training < costs.evaluation + costs.step:
        raise UserError(
            f"trainer.time_budget_minutes={budget_minutes:g} is too small: start-up took {costs.spent / 60:.1f} min, "
            f"one validation needs ~{costs.evaluation / 60:.1f} min and the test scoring ~{costs.test / 60:.1f} min "
            f"(raise it, or lower data.valid_max_sentences)"
        )
    reference_evals = max(1, t.max_steps // max(t.eval_every, 1))
    affordable_evals = int(EVAL_SHARE * budget // max(costs.evaluation, 1e-9))
    evals = max(1, min(reference_evals, affordable_evals))
    steps = max(1, int((training - evals * costs.evaluation) // costs.step))
    ratio = steps / t.max_steps
    max_minutes = training / 60 if not t.max_minutes else min(training / 60, t.max_minutes)
    return Plan(
        max_steps=steps,
        warmup_steps=planned_warmup(t.warmup_steps, ratio, steps),
        eval_every=max(1, math.ceil(steps / evals)),
        save_every=max(1, round(t.save_every * ratio)) if t.save_every else 0,
        max_minutes=max_minutes,
    )


def planned_warmup(warmup: int, ratio: float, steps: int) -> int:
    """Warmup for a schedule ``ratio`` times the reference's length. A longer schedule scales
    it; a shorter one keeps the reference's warmup up to a quarter of its updates: the
    optimizer needs about as many updates to settle at the peak rate however long the run.
    (Scaled down with the rest, the Multi30k recipe's 800 became 84 of 1,048 updates in a
    10-minute budget, and lr 3e-3 came that soon: test BLEU 3.5.)"""
    if not warmup:
        return 0
    if ratio >= 1:
        return round(warmup * ratio)
    return max(1, min(warmup, round(MAX_WARMUP_SHARE * steps)))


def apply_plan(t: Any, plan: dict) -> None:
    """Write a plan (as stored in a checkpoint: Plan's fields, and the costs it was made
    from under ``measured``) into the trainer config node ``t``."""
    for key, value in plan.items():
        if key != "measured":
            setattr(t, key, value)


def timed(run: Callable[[], Any]) -> float:
    """Seconds ``run()`` takes on ``clock``."""
    start = clock()
    run()
    return clock() - start


def search_seconds(search: Callable[[], list[int]], reference_lengths: int) -> float:
    """Seconds of ``search`` (which returns its hypotheses' lengths) as if it had written
    ``reference_lengths`` subwords: an untrained model writes to the length limit, a
    trained one about as long as the references, and search time grows with the output."""
    start = clock()
    produced = sum(search())
    return (clock() - start) * min(1.0, reference_lengths / max(produced, 1))


def measure_costs(
    started: float,
    update: Callable[[Any], Any],
    groups: list,
    valid_loss: Callable[[], Any],
    eval_sample: Callable[[], float],
    test_sample: Callable[[], float],
    scale: float,
    warm: int = 3,
) -> Costs:
    """Time ``update`` on ``groups`` (the first ``warm`` untimed: kernels and pages are built
    then) and the validation loss; ``eval_sample`` and ``test_sample`` give the seconds of
    the validation and test searches on a sample of sentences (``search_seconds``), scaled
    by ``scale`` (the split's size over the sample's). The caller undoes what the updates changed."""
    warm = min(warm, len(groups) - 1)
    for group in groups[:warm]:
        update(group)
    step = timed(lambda: [update(group) for group in groups[warm:]]) / len(groups[warm:])
    evaluation = timed(valid_loss) + eval_sample() * scale
    test = test_sample() * scale
    return Costs(spent=clock() - started, step=step, evaluation=evaluation, test=test)
