"""The training recipe, one straight line: setup -> run -> finish.

One loop serves CPU and CUDA, one process or many (torchrun + DDP). Everything a resumed
run needs is in the checkpoint: weights, optimizer, scaler, RNG states, and where in which
epoch it stopped, so a killed run continues with the same batches and the same dropout.
``Trainer.__init__`` is a list of ``setup_*`` steps; the jobs around the loop live in their
own modules: distributed.py (ranks, seeds), state.py (progress, checkpoints), step.py (one
update), validation.py (loss and BLEU), runlog.py (metrics, to the loggers of loggers.py),
budget.py (the time budget).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from transformer.allocator import active_allocator
from transformer.checkpoint import CHECKPOINT_DIR
from transformer.config import TrainConfig, to_dict, typed
from transformer.data.batching import Example, chunked, collate
from transformer.errors import UserError
from transformer.hardware import detect
from transformer.rundir import write_results
from transformer.train import budget
from transformer.train.build import Runtime, setup_model, setup_runtime
from transformer.train.calibrate import plan_budget
from transformer.train.distributed import all_rng_states, finish_distributed, seed_everything, share
from transformer.train.ema import EMA, averaged
from transformer.train.examples import RunData
from transformer.train.init import init_from
from transformer.train.loggers import RunInfo, logger_classes
from transformer.train.optim import NO_ANCHOR
from transformer.train.resume import changes_record, check_resume
from transformer.train.runlock import hold_run_dir
from transformer.train.runlog import RunLog, train_record
from transformer.train.state import (
    Progress,
    average_last,
    find_resume,
    restore_training,
    training_checkpoint,
    write_checkpoints,
)
from transformer.train.step import Tally, host_stats, update
from transformer.train.stopping import BadSteps, catch_signals, patience_spent, stop_reason
from transformer.train.validation import validate

log = logging.getLogger(__name__)
TestFn = Callable[[Path, torch.device], dict]  # scores the final checkpoint on the test split


class Trainer:
    """State of one run: the model, optimizer, data and where it stands."""

    def __init__(self, cfg: TrainConfig | DictConfig, started: float | None = None):
        cfg = typed(cfg, TrainConfig)
        loggers = logger_classes(cfg.trainer.loggers)  # an unknown name stops here, before any work
        started = budget.clock() if started is None else started
        rt = setup_runtime(cfg)
        self.dist, self.device, self.precision = rt.dist, rt.device, rt.precision
        resume = find_resume(cfg.trainer.resume)
        init, model = init_from(cfg)  # init_from's checkpoint and the model config it brings; resume wins over it
        self.cfg = cfg = replace(cfg, run_dir=rt.run_dir, model=model)  # the run's config, resolved once
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / CHECKPOINT_DIR
        changes = check_resume(cfg, resume)  # a change that breaks exactness stops here, before the data
        self.data = RunData(cfg, self.dist, resume or init)
        self.tokenizer = self.data.tokenizer
        self.model_cfg, self.model, self.net, self.optimizer, self.scaler = setup_model(
            cfg, self.tokenizer, rt, None if resume else init
        )
        self.tally = Tally(self.device) if rt.deferred else None  # trainer.deferred_metrics
        self.setup_state(resume, started, rt)
        resumed_at, total = self.progress.step if resume else None, self.schedule.max_steps
        run = RunInfo(self.run_dir, resumed_at, total, cfg.trainer.progress, to_dict(cfg))
        self.runlog = RunLog(loggers, run, enabled=self.dist.main)
        if changes:
            self.runlog.log("resume", changes_record(self.progress.step, changes))

    # setup -------------------------------------------------------------------------

    def setup_state(self, resume: tuple[Path, dict] | None, started: float, rt: Runtime) -> None:
        """Progress from the checkpoint resumed (or zero), dropout seeds, the budget's plan."""
        t = self.cfg.trainer
        self.progress = Progress()
        self.stop_signal: int | None = None
        self.interrupted = False
        self.bad_steps = BadSteps(t.max_bad_steps)
        seed_everything(t.seed + self.dist.rank)  # dropout streams differ across ranks
        self.ema = EMA(self.model, t.ema_decay) if t.ema_decay else None
        if resume is not None:
            parts = {"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler, "ema": self.ema}
            self.progress = restore_training(*resume, **parts, tokenizer=self.tokenizer, dist=self.dist)
        self.plan: budget.Plan | None = None
        self.schedule = t  # the trainer config, or a copy with the budget's plan in it
        if t.time_budget_minutes:
            if self.progress.plan is None:
                parts = (self.model, self.optimizer, self.scaler)
                self.progress.plan = plan_budget(self.cfg, self.data, parts, self.train_step, rt, started)
            self.plan = budget.Plan.from_dict(self.progress.plan)
            self.schedule = self.plan.schedule(t)
        size = "streamed" if self.data.streaming else f"{len(self.data.train_examples)}"
        n_params, n_valid = f"{self.model.num_parameters():,}", len(self.data.valid_examples)
        log.info("model: %s parameters; %s training pairs, %d validation", n_params, size, n_valid)
        log.info("hardware: %s; training in %s; allocator %s", detect().describe(), self.precision, active_allocator())

    # the loop ----------------------------------------------------------------------

    def train_step(self, group: list[list[Example]]) -> dict:
        """One optimizer update over ``group`` (update_freq batches); see step.update."""
        buckets, pad_id = self.cfg.data.length_buckets, self.model_cfg.pad_id
        batches = [collate(examples, pad_id, buckets).to(self.device) for examples in group]
        parts = (self.net, self.model, self.optimizer, self.scaler)
        step, d_model, world = self.progress.step + 1, self.model_cfg.d_model, self.dist.world
        anchor = (self.plan.revised_at, self.plan.anchor) if self.plan else NO_ANCHOR
        return update(
            *parts,
            batches,
            t=self.schedule,
            precision=self.precision,
            step=step,
            d_model=d_model,
            world=world,
            anchor=anchor,
            deferred=self.tally is not None,
        )

    def run(self) -> dict:
        t = self.schedule
        start = budget.clock() - self.progress.elapsed
        self.window = {"tokens": 0, "time": time.time()}  # for tokens/s between log lines
        stop = "steps" if self.progress.step >= t.max_steps else ""
        with catch_signals(self.on_signal):
            while not stop:
                batches = self.data.epoch_batches(self.progress.epoch, skip=self.progress.batch_in_epoch)
                for group in chunked(batches, t.update_freq):
                    stats = self.train_step(group)
                    self.progress.batch_in_epoch += len(group)
                    if self.guard(stats) and (stop := self.after_update(stats, start)):
                        break
                else:
                    stop = self.end_epoch()
        self.runlog.close()
        p, minutes = self.progress, (budget.clock() - start) / 60
        summary = {"step": p.step, "best_valid_bleu": p.best_bleu, "best_step": p.best_step, "minutes": minutes}
        return summary | {"interrupted": self.interrupted}

    def on_signal(self, signum: int) -> None:
        self.stop_signal = signum

    def after_update(self, stats: dict, start: float) -> str:
        """Count the update, log, then validate and save when due; why to stop ("" to go on)."""
        t = self.schedule
        if self.ema is not None:
            self.ema.update()  # trainer.ema_decay: the average after every optimizer step
        self.progress.step += 1
        self.progress.elapsed = budget.clock() - start
        self.window["tokens"] += stats["tokens"]
        step = self.progress.step
        self.runlog.advance()
        if step % t.log_every == 0 or step == 1:
            stats = stats if self.tally is None else self.settle(stats)
            now = time.time()
            stats["tokens_per_s"] = self.window["tokens"] / max(now - self.window["time"], 1e-9)
            self.window = {"tokens": 0, "time": now}
            self.log_train(stats)
        stop = stop_reason(t, step, self.progress.elapsed, self.stop_signal is not None, self.dist, self.device)
        if stop == "signal":  # save at once: no validation when the machine is being taken away
            note = "received signal %d: saved a checkpoint at step %d; continue with trainer.resume=%s"
            log.warning(note, self.stop_signal or 0, step, self.run_dir)
            self.interrupted = True
            self.save()
        elif self.due(step, t.eval_every) or stop:
            best = self.validate()
            if patience_spent(t.patience, self.progress):
                stop = "patience"
            if self.plan is not None and not stop:
                self.revise_plan(self.progress.elapsed, start)
            self.save(best=best)
        elif self.due(step, t.save_every):
            self.save()
        return stop

    def due(self, step: int, every: int) -> bool:
        """Whether ``step`` is an evaluation (or save) step; a budget's plan counts from its last revision."""
        return self.plan.due(step, every) if self.plan else every > 0 and step % every == 0

    def revise_plan(self, before: float, start: float) -> None:
        """The budget's plan refitted after the validation that began at ``before`` seconds of
        training (budget.revise); kept in the progress, so the checkpoint saved next holds it."""
        t, after = self.cfg.trainer, budget.clock() - start
        revised = budget.revise(self.plan, t, self.progress.step, before, after).to_dict() if self.dist.main else None
        self.plan = budget.Plan.from_dict(share(revised, self.dist))
        self.progress.plan = {**(self.progress.plan or {}), **self.plan.to_dict()}
        self.schedule = self.plan.schedule(t)
        self.runlog.replan(self.plan.max_steps)
        log.info("%s", self.plan.line())

    def end_epoch(self) -> str:
        """Move to the next epoch; "epochs" once trainer.max_epochs are done (validated and saved)."""
        if self.progress.batch_in_epoch == 0:
            raise UserError(
                f"data.max_tokens={self.cfg.data.max_tokens} gives no batches for {self.dist.world} processes"
            )
        self.progress.epoch += 1
        self.progress.batch_in_epoch = 0
        if self.cfg.trainer.max_epochs and self.progress.epoch >= self.cfg.trainer.max_epochs:
            self.save(best=self.validate())
            return "epochs"
        return ""

    def guard(self, stats: dict) -> bool:
        """False for a NaN/inf step (skipped); stops after trainer.max_bad_steps in a row.
        Deferred metrics: the device has skipped it, and ``settle`` counts it at the log step."""
        if self.tally is not None:
            self.tally.add(stats["finite"])
            return True
        if self.bad_steps.finite(stats, self.progress.step + 1, self.precision):
            return True
        if error := self.bad_steps.error(self.progress.step, self.ckpt_dir / "last.pt"):
            self.save()
            raise error
        return False

    def settle(self, stats: dict) -> dict:
        """Deferred metrics, read at a log step (the one wait for the GPU between log lines):
        this update's statistics and the tokens since the last line; the non-finite updates
        the device skipped are reported, and trainer.max_bad_steps of them in a row stop the run."""
        self.window["tokens"] = int(self.window["tokens"])
        skipped, self.bad_steps.count = self.tally.read()
        if skipped:
            log.warning("step %d: %d non-finite updates since the last log line, skipped", self.progress.step, skipped)
        if error := self.bad_steps.error(self.progress.step, self.ckpt_dir / "last.pt"):
            self.save()
            raise error
        return host_stats(stats)

    # logging, validation, checkpoints ----------------------------------------------

    def log_train(self, stats: dict) -> None:
        cuda = self.device.type == "cuda"
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else None
        record = train_record(self.progress.step, self.progress.epoch, self.progress.elapsed, stats, peak)
        self.runlog.log("train", record)

    def validate(self) -> bool:
        """Validation NLL and BLEU on rank 0; returns whether this is the best BLEU so far
        (the same answer on every rank)."""
        if self.dist.main:
            with averaged(self.model, self.ema):  # the EMA's weights are the ones validated
                validate(self.model, self.data, self.cfg, self.progress, self.runlog, self.device, self.precision)
        self.progress = Progress(**share(vars(self.progress), self.dist))
        return self.progress.best_step == self.progress.step and self.progress.evals_without_gain == 0

    def save(self, best: bool = False) -> None:
        """Checkpoints of this step (see state.write_checkpoints); a collective under DDP."""
        ckpt = training_checkpoint(
            model=self.model,
            model_cfg=self.model_cfg,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            scaler=self.scaler,
            progress=self.progress,
            rngs=all_rng_states(self.dist),
            cfg=self.cfg,
            ema=self.ema,
        )
        if self.dist.main:
            write_checkpoints(ckpt, self.ckpt_dir, self.progress.step, best, self.cfg.trainer)

    def finish(self, test: TestFn | None = None) -> dict:
        """Averaging, then ``test`` (evaluate.py's scoring) on the best or averaged checkpoint."""
        t = self.cfg.trainer
        if not self.dist.main or self.interrupted:  # stopped by a signal: leave the run as it is, ready to resume
            return {}
        final = average_last(self.ckpt_dir, t.average_last) if t.average_last > 1 else self.ckpt_dir / "best.pt"
        if test is not None and self.cfg.evaluate_test and final.exists():
            return {"test": test(final, self.device)}
        return {}


def train(cfg: TrainConfig | DictConfig, test: TestFn | None = None) -> dict:
    """Train with a composed config (a ``TrainConfig``, or Hydra's node of one); returns the run's
    metrics, with ``test``'s scores of the final checkpoint (``transformer.train`` passes evaluate's)."""
    cfg = typed(cfg, TrainConfig)
    if not cfg.run_dir:
        raise UserError("run_dir must be set (the CLI sets it to Hydra's output directory)")
    if cfg.trainer.resume and Path(cfg.trainer.resume).is_dir():
        cfg = replace(cfg, run_dir=str(Path(cfg.trainer.resume).expanduser()))
    with hold_run_dir(cfg.run_dir, main=os.environ.get("RANK", "0") == "0"):  # one training at a time writes here
        metrics = train_holding_lock(cfg, test)
    finish_distributed()
    return metrics


def train_holding_lock(cfg: TrainConfig, test: TestFn | None) -> dict:
    """train() inside the run directory's lock: set up, run, finish, write results.json."""
    trainer = Trainer(cfg, budget.clock())
    metrics = trainer.run()
    metrics.update(trainer.finish(test))
    metrics.update(run_dir=str(trainer.run_dir), precision=trainer.precision, allocator=active_allocator())
    metrics["hardware"] = detect().to_dict()
    metrics["model"] = asdict(trainer.model_cfg)  # as trained (trainer.init_from: the checkpoint's), for the card
    if trainer.progress.plan:
        metrics["budget_plan"] = trainer.progress.plan
    if trainer.dist.main:
        write_results(trainer.run_dir, metrics)
    return metrics
