"""The time budget: the start-up plan, its revisions from the measured pace, the lr schedule
going on from where it stood, and whole runs on a fake clock (slowing halfway, faster than
the start-up guess, killed and resumed)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import compose_config
from training import train_quietly
from transformer.checkpoint import load_checkpoint
from transformer.config import TrainerConfig
from transformer.errors import UserError
from transformer.train import budget, loop
from transformer.train.optim import lr_at


def reference(**overrides: float) -> TrainerConfig:
    keys = {"max_steps": 10000, "warmup_steps": 800, "eval_every": 1000, "save_every": 150, "max_minutes": 0.0}
    return TrainerConfig(**{**keys, "schedule": "cosine", "lr": 3e-3, "min_lr": 1e-5, **overrides})


def test_plan_scales_the_whole_schedule() -> None:
    costs = budget.Costs(spent=60, step=1.8, evaluation=30, test=90)
    plan = budget.plan_schedule(reference(), 60, costs)
    usable = 3600 * (1 - budget.MARGIN)
    evals = int(budget.EVAL_SHARE * usable // 30)  # 5 of the reference 10 fit in 5% of the hour
    assert plan.max_steps == int((usable - 60 - 90 - evals * 30) // 1.8)
    ratio = plan.max_steps / 10000
    assert plan.save_every == round(150 * ratio) and plan.evaluations == evals
    assert plan.warmup_steps == min(800, round(budget.MAX_WARMUP_SHARE * plan.max_steps))  # not 800 * ratio
    assert plan.eval_every == -(-plan.max_steps // evals)
    assert plan.max_minutes == pytest.approx((usable - 60 - 90) / 60)
    fast = budget.plan_schedule(reference(max_minutes=50), 60, budget.Costs(spent=30, step=0.2, evaluation=5, test=20))
    assert fast.max_steps > 10000 and fast.eval_every == -(-fast.max_steps // 10) and fast.max_minutes == 50
    assert fast.warmup_steps == round(800 * fast.max_steps / 10000)  # a longer schedule scales its warmup


def test_planned_warmup_keeps_the_reference_warmup_in_a_shorter_run() -> None:
    assert budget.planned_warmup(800, 0.1048, 1048) == 262  # a quarter of the updates, not 84
    assert budget.planned_warmup(800, 0.5, 5000) == 800  # the reference's, where it fits
    assert budget.planned_warmup(800, 2.0, 20000) == 1600
    assert budget.planned_warmup(0, 0.1, 1000) == 0 and budget.planned_warmup(800, 0.001, 2) == 1


def test_plan_refuses_a_budget_without_room_for_one_evaluation() -> None:
    with pytest.raises(UserError, match=r"trainer.time_budget_minutes=1 is too small: start-up took 0.8 min"):
        budget.plan_schedule(reference(), 1, budget.Costs(spent=50, step=1, evaluation=30, test=5))


def test_plan_is_one_readable_line_and_a_frozen_record() -> None:
    plan = budget.Plan(5520, 800, 427, 83, 57.0, 0.6187, 30.04, 13)
    assert plan.line() == (
        "plan: 5,520 updates in 57.0 min, 0.62 s each, warmup 800, eval every 427 (13 to go, 30.0 s each), save every 83"
    )
    assert replace(plan, revised_at=1200).line().startswith("plan at step 1,200: 5,520 updates")
    assert budget.Plan.from_dict({**plan.to_dict(), "measured": {"step": 1.0}}) == plan
    with pytest.raises(AttributeError):
        plan.max_steps = 1  # type: ignore[misc]
    assert plan.schedule(reference()).max_steps == 5520 and reference().max_steps == 10000  # a copy, not the config


def lr_of(plan: budget.Plan, t: TrainerConfig, step: int) -> float:
    return lr_at(step, plan.schedule(t), 128, (plan.revised_at, plan.anchor))


@pytest.mark.parametrize("at", [300, 1000])  # in the warmup, in the cosine decay
@pytest.mark.parametrize("pace", [0.5, 2.0, 0.1])  # faster, slower than planned; much faster (the warmup grows)
def test_a_revision_goes_on_from_the_same_rate_and_ends_at_min_lr(at: int, pace: float) -> None:
    t = reference()
    plan = budget.plan_schedule(t, 60, budget.Costs(spent=60, step=1.0, evaluation=30, test=90))
    before = at * pace
    revised = budget.revise(plan, t, at, before, before + 20)
    assert revised.revised_at == at and revised.evaluations == plan.evaluations - 1 and revised.eval_seconds == 20
    assert revised.step_seconds == pace
    left = plan.max_minutes * 60 - before - 20
    assert revised.max_steps == at + int((left - revised.evaluations * 20) // pace)
    assert (revised.max_steps > plan.max_steps) == (pace < 1.0)
    assert lr_of(revised, t, at) == pytest.approx(lr_of(plan, t, at), rel=1e-9)  # no jump
    steps = range(at, revised.max_steps + 1)
    rates = [lr_of(revised, t, s) for s in steps]
    peak = steps[rates.index(max(rates))]
    assert peak == max(at, revised.warmup_steps)  # still rising to the peak until the (refitted) warmup ends
    assert rates[-1] == pytest.approx(t.min_lr)
    refitted = budget.planned_warmup(800, revised.max_steps / 10000, revised.max_steps)
    assert revised.warmup_steps == (refitted if at < plan.warmup_steps else plan.warmup_steps)


# whole runs on a fake clock ---------------------------------------------------------


class FakeClock:
    """Time that moves only when the run does work: ``pace(trainer)`` seconds an update,
    ``evaluation`` seconds a validation. Dyadic figures keep every sum exact."""

    def __init__(self, pace: Callable[[loop.Trainer, float], float], evaluation: float = 2.0):
        self.now, self.pace, self.evaluation = 0.0, pace, evaluation

    def __call__(self) -> float:
        return self.now

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_step, real_validate = loop.Trainer.train_step, loop.validate

        def train_step(trainer: loop.Trainer, group: list) -> dict:
            self.now += self.pace(trainer, self.now)
            return real_step(trainer, group)

        def validate(*args, **kwargs) -> None:
            self.now += self.evaluation
            real_validate(*args, **kwargs)

        monkeypatch.setattr(budget, "clock", self)
        monkeypatch.setattr(loop.Trainer, "train_step", train_step)
        monkeypatch.setattr(loop, "validate", validate)


BUDGET_MINUTES = 2.0


def budgeted(run_dir: Path, *overrides: str):
    return compose_config(
        "train",
        [
            "experiment=tiny",
            "evaluate_test=false",
            f"run_dir={run_dir}",
            "trainer.log_every=1",
            "trainer.precision=fp32",
            "model.dropout=0.1",
            f"trainer.time_budget_minutes={BUDGET_MINUTES}",
            "trainer.max_steps=200",  # the reference: 10 evaluations, a checkpoint every 3 updates
            "trainer.eval_every=20",
            "trainer.save_every=3",
            "trainer.warmup_steps=20",
            "trainer.lr=1e-3",
            "trainer.min_lr=1e-4",
            *overrides,
        ],
    )


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the one real-time figure (tokens/s)."""
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


def assert_on_time_and_annealed(metrics: dict, run_dir: Path, clock: FakeClock) -> None:
    """Ended within 2% of the budget, by its plan's last step, with the cosine at min_lr."""
    budget_s = BUDGET_MINUTES * 60
    assert abs(clock.now - budget_s) <= 0.02 * budget_s, (clock.now, metrics["budget_plan"])
    assert metrics["step"] == metrics["budget_plan"]["max_steps"]  # the schedule's end, not the time limit
    last = [r for r in records(run_dir) if "lr" in r][-1]
    assert last["step"] == metrics["step"] and last["lr"] == pytest.approx(1e-4, rel=0.05)


def calibrating(trainer: loop.Trainer) -> bool:
    return trainer.progress.plan is None  # the start-up timings (undone afterwards)


@pytest.mark.slow
def test_a_machine_that_slows_halfway_still_ends_on_time_annealed(tmp_path: Path, monkeypatch, caplog) -> None:
    clock = FakeClock(lambda trainer, now: 0.5 if now < BUDGET_MINUTES * 30 else 1.0)
    clock.install(monkeypatch)
    with caplog.at_level(logging.INFO, logger="transformer.train"):
        metrics = train_quietly(budgeted(tmp_path))
    plans = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan")]
    first = re.fullmatch(r"plan: (\d+) updates in 1\.9 min, 0\.50 s each, warmup \d+, eval every \d+ .*", plans[0])
    assert first and metrics["step"] < int(first[1])  # planned at the first pace, then cut
    assert len(plans) == 10 and all(line.startswith("plan at step ") for line in plans[1:])  # once per evaluation
    assert plans[-1].split(": ")[1].startswith(f"{metrics['step']} updates in 1.9 min, 1.00 s each")
    assert_on_time_and_annealed(metrics, tmp_path, clock)


@pytest.mark.slow
def test_a_machine_faster_than_its_start_up_guess_uses_the_budget(tmp_path: Path, monkeypatch) -> None:
    clock = FakeClock(lambda trainer, now: 3.0 if calibrating(trainer) else 0.5)  # 6x faster after start-up
    clock.install(monkeypatch)
    metrics = train_quietly(budgeted(tmp_path))
    measured = metrics["budget_plan"]["measured"]
    first = budget.plan_schedule(
        loop.typed(budgeted(tmp_path), loop.TrainConfig).trainer, BUDGET_MINUTES, budget.Costs(**measured)
    )
    assert measured["step"] == 3.0 and metrics["step"] > 4 * first.max_steps
    assert_on_time_and_annealed(metrics, tmp_path, clock)


@pytest.mark.slow
def test_a_killed_budgeted_run_resumes_exactly_with_its_revisions(tmp_path: Path, monkeypatch) -> None:
    """Killed (an exception in update 95) after several revisions, then resumed from its last
    checkpoint: the same losses, rates, evaluations and plan as the run never stopped."""
    clock = FakeClock(lambda trainer, now: 0.5 if trainer.progress.step < 60 else 1.0)
    clock.install(monkeypatch)
    full = train_quietly(budgeted(tmp_path / "full"))
    killed = tmp_path / "killed"
    real_step = loop.Trainer.train_step

    def dies(trainer: loop.Trainer, group: list) -> dict:
        if trainer.progress.step + 1 == 95:
            raise RuntimeError("killed")
        return real_step(trainer, group)

    monkeypatch.setattr(loop.Trainer, "train_step", dies)
    with pytest.raises(RuntimeError, match="killed"):
        train_quietly(budgeted(killed))
    stopped = load_checkpoint(killed / "checkpoints/last.pt")["progress"]
    assert 60 < stopped["step"] < 95 and stopped["plan"]["revised_at"] > 40  # after revisions, between evaluations
    monkeypatch.setattr(loop.Trainer, "train_step", real_step)  # the fake clock's, without the kill
    resumed = train_quietly(budgeted(killed, f"trainer.resume={killed}"))
    assert records(killed) == records(tmp_path / "full")
    assert resumed["budget_plan"] == full["budget_plan"] and resumed["step"] == full["step"]
    a, b = (load_checkpoint(run / "checkpoints/last.pt")["model"] for run in (tmp_path / "full", killed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_time_budget_too_small_fails_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    FakeClock(lambda trainer, now: 10.0).install(monkeypatch)
    with pytest.raises(UserError, match="trainer.time_budget_minutes=0.1 is too small"):
        train_quietly(budgeted(tmp_path / "run", "trainer.time_budget_minutes=0.1"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(UserError, match="trainer.time_budget_minutes=-1.0 must be >= 0"):
        train_quietly(budgeted(tmp_path / "neg", "trainer.time_budget_minutes=-1"))
