"""``trainer.time_budget_minutes``: the whole run in a wall-clock budget on whatever machine.

The recipe's schedule (``max_steps`` updates, warmup, evaluations and checkpoints at fixed
steps) is the reference. At start-up the run times a few throwaway updates, one validation
and a sample of the test search, and scales every step count by the same factor so that
BPE, training, evaluations and the final test scoring end inside the budget (``plan_schedule``).
That first pace is a guess (the first updates run on cold caches, another process may start
or stop), so after every evaluation the plan is revised from the pace measured since the
last one (``revise``): the updates left, the warmup (while it is not reached), the spacing of
evaluations and checkpoints are fitted to the time left, and the learning-rate schedule goes
on from where it stood (``optim.lr_at``'s anchor), so the cosine still ends at ``min_lr``
when the time does. The plan is a frozen object stored in every checkpoint (``Progress.plan``),
so a resumed run continues with the revision it had; training also stops at the plan's
``max_minutes`` should the last stretch run slower than any revision could foresee.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from transformer.config import TrainerConfig
from transformer.errors import UserError
from transformer.train.optim import phase_anchor

clock = time.monotonic  # tests replace it with a fake clock
MARGIN = 0.015  # share of the budget kept free for what the timings miss (the last saves, averaging, the exit)
EVAL_SHARE = 0.05  # at most this share of the budget goes to validation; fewer evaluations beyond it
MAX_WARMUP_SHARE = 0.25  # a shortened schedule warms up over at most this share of its updates


@dataclass
class Costs:
    """Seconds, measured on this machine at start-up."""

    spent: float  # since the run began: reading, BPE, encoding, these timings
    step: float  # one optimizer update
    evaluation: float  # one validation (loss and BLEU)
    test: float  # the final test scoring


@dataclass(frozen=True)
class Plan:
    """The schedule the budget fixed, used instead of the trainer config's keys of the same
    names (never written into the config); a revision is a new Plan."""

    max_steps: int
    warmup_steps: int
    eval_every: int
    save_every: int
    max_minutes: float  # training time (evaluations included) after which the run stops anyway
    step_seconds: float = 0.0  # the pace (one update, saves and logging included) this plan was made from
    eval_seconds: float = 0.0  # one validation, as last measured
    evaluations: int = 1  # validations from revised_at to the end, the one at max_steps included
    revised_at: int = 0  # the step of this revision: evaluations and saves are counted from here
    revised_elapsed: float = 0.0  # training seconds at revised_at (after its validation)
    anchor: float = 0.0  # progress of the lr schedule's phase at revised_at (optim.lr_at's anchor)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, stored: dict) -> Plan:
        """A plan as stored in a checkpoint (other keys, such as ``measured``, are left out)."""
        return cls(**{f.name: stored[f.name] for f in fields(cls) if f.name in stored})

    def due(self, step: int, every: int) -> bool:
        """Whether ``step`` is an evaluation (or save) step of this plan."""
        return every > 0 and (step - self.revised_at) % every == 0

    def schedule(self, t: TrainerConfig) -> TrainerConfig:
        """The trainer config ``t`` (a TrainerConfig) with this plan's settings: a copy."""
        keys = ("max_steps", "warmup_steps", "eval_every", "save_every", "max_minutes")
        return replace(t, **{k: getattr(self, k) for k in keys})

    def line(self) -> str:
        """The plan in one readable line for the log and the run card."""
        where = f" at step {self.revised_at:,}" if self.revised_at else ""
        save = f", save every {self.save_every:,}" if self.save_every else ""
        return (
            f"plan{where}: {self.max_steps:,} updates in {self.max_minutes:.1f} min, {self.step_seconds:.2f} s each, "
            f"warmup {self.warmup_steps:,}, eval every {self.eval_every:,} ({self.evaluations} to go, "
            f"{self.eval_seconds:.1f} s each){save}"
        )


def plan_schedule(t: TrainerConfig, budget_minutes: float, costs: Costs) -> Plan:
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
    return Plan(
        max_steps=steps,
        warmup_steps=planned_warmup(t.warmup_steps, ratio, steps),
        eval_every=max(1, math.ceil(steps / evals)),
        save_every=planned_saves(t.save_every, ratio),
        max_minutes=training / 60 if not t.max_minutes else min(training / 60, t.max_minutes),
        step_seconds=costs.step,
        eval_seconds=costs.evaluation,
        evaluations=evals,
    )


def revise(plan: Plan, t: TrainerConfig, step: int, before: float, after: float) -> Plan:
    """The plan after the evaluation at ``step``, which ran from ``before`` to ``after``
    seconds of training: the pace since the last revision (saves and logging included) and
    this evaluation's time fit the updates left, and the evaluations left, into the time left.
    ``t`` is the reference schedule (the trainer config). The warmup is refitted while it is
    not reached (noam's keeps its length: its peak and decay depend on it)."""
    pace = max((before - plan.revised_elapsed) / max(step - plan.revised_at, 1), 1e-6)
    evaluation = after - before
    evaluations = max(1, plan.evaluations - 1)
    left = plan.max_minutes * 60 - after
    steps_left = max(1, int((left - evaluations * evaluation) // pace))
    max_steps = step + steps_left
    ratio = max_steps / t.max_steps
    warmup = plan.warmup_steps
    if step < warmup and t.schedule != "noam":
        warmup = max(step + 1, planned_warmup(t.warmup_steps, ratio, max_steps))
    return replace(
        plan,
        max_steps=max_steps,
        warmup_steps=warmup,
        eval_every=max(1, math.ceil(steps_left / evaluations)),
        save_every=planned_saves(t.save_every, ratio),
        step_seconds=pace,
        eval_seconds=evaluation,
        evaluations=evaluations,
        revised_at=step,
        revised_elapsed=after,
        anchor=phase_anchor(step, plan.schedule(t), (plan.revised_at, plan.anchor)),
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


def planned_saves(save_every: int, ratio: float) -> int:
    """Checkpoint spacing (the checkpoints averaged at the end) for a schedule ``ratio`` times the reference's."""
    return max(1, round(save_every * ratio)) if save_every else 0


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
