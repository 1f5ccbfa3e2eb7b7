"""The training recipe, one straight line: setup -> run -> finish.

One loop serves CPU and CUDA, one process or many (torchrun + DDP). Everything a resumed
run needs is in the checkpoint: weights, optimizer, scaler, RNG states, and where in which
epoch it stopped, so a killed run continues with the same batches and the same dropout.
``Trainer.__init__`` is a list of ``setup_*`` steps; the jobs around the loop live in their
own modules: distributed.py (ranks, seeds), state.py (progress, checkpoints), step.py (one
update), validation.py (loss and BLEU), runlog.py (metrics), budget.py (the time budget).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import OmegaConf

from transformer.config import DecodeConfig
from transformer.data.batching import Example, chunked, collate
from transformer.decode.translator import translate_ids
from transformer.errors import UserError
from transformer.hardware import detect
from transformer.rundir import TRAIN_KEYS, write_results
from transformer.train import budget
from transformer.train.build import setup_model, setup_runtime
from transformer.checkpoint import CHECKPOINT_DIR
from transformer.train.distributed import all_rng_states, finish_distributed, seed_everything, share
from transformer.train.examples import RunData
from transformer.train.init import apply_init_from
from transformer.train.runlog import RunLog
from transformer.train.state import Progress, average_last, find_resume, restore_training, throwaway, training_checkpoint, write_checkpoints
from transformer.train.step import update
from transformer.train.stopping import catch_signals, stop_reason
from transformer.train.validation import eval_decode_config, samples_text, valid_bleu, valid_loss, valid_record

log = logging.getLogger(__name__)
TestFn = Callable[[Path, torch.device], dict]  # scores the final checkpoint on the test split


class Trainer:
    """State of one run: the model, optimizer, data and where it stands."""

    def __init__(self, cfg: Any, started: Optional[float] = None):
        self.cfg = cfg
        started = budget.clock() if started is None else started
        rt = setup_runtime(cfg)
        self.dist, self.device, self.precision = rt.dist, rt.device, rt.precision
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / CHECKPOINT_DIR
        resume = find_resume(cfg.trainer.resume)
        init = apply_init_from(cfg)  # cfg.model becomes the checkpoint's; resume wins over it
        self.data = RunData(cfg, self.dist, resume or init)
        self.tokenizer = self.data.tokenizer
        self.model_cfg, self.model, self.net, self.optimizer, self.scaler = setup_model(cfg, self.tokenizer, rt, None if resume else init)
        self.setup_state(resume, started)
        self.runlog = RunLog(self.run_dir, enabled=self.dist.main, resumed_at=self.progress.step if resume else None,
                             bar=cfg.trainer.progress, total=cfg.trainer.max_steps)

    # setup -------------------------------------------------------------------------

    def setup_state(self, resume: Optional[tuple[Path, dict]], started: float) -> None:
        """Progress from the checkpoint resumed (or zero), dropout seeds, the budget's plan."""
        t = self.cfg.trainer
        self.progress = Progress()
        self.stop_signal: Optional[int] = None
        self.interrupted = False
        self.bad_steps = 0
        seed_everything(t.seed + self.dist.rank)  # dropout streams differ across ranks
        if resume is not None:
            self.progress = restore_training(*resume, model=self.model, optimizer=self.optimizer, scaler=self.scaler, tokenizer=self.tokenizer, dist=self.dist)
        if t.time_budget_minutes:
            if self.progress.plan is None:
                self.progress.plan = self.plan_budget(started)
            budget.apply_plan(t, self.progress.plan)
        size = "streamed" if self.data.streaming else f"{len(self.data.train_examples)}"
        log.info("model: %s parameters; %s training pairs, %d validation", f"{self.model.num_parameters():,}", size, len(self.data.valid_examples))
        log.info("hardware: %s; training in %s", detect().describe(), self.precision)

    def plan_budget(self, started: float) -> dict:
        """Fit the schedule to trainer.time_budget_minutes from updates and searches timed
        now, then undone: the run is the one an unbudgeted run with the plan would be."""
        t, sample = self.cfg.trainer, self.data.valid_source_ids[:64]
        wanted = sum(len(e.tgt) - 1 for e in self.data.valid_examples[: len(sample)])  # reference subwords + EOS

        def search(cfg: DecodeConfig) -> float:
            return budget.search_seconds(lambda: [len(h[0].tokens) for h in translate_ids([self.model], sample, cfg)], wanted)

        with throwaway(self.model, self.optimizer, self.scaler):
            costs = budget.measure_costs(
                started, self.train_step, list(itertools.islice(chunked(self.data.epoch_batches(0), t.update_freq), 13)),
                lambda: valid_loss(self.model, self.data.valid_examples, self.cfg.data.max_tokens, self.device, self.precision),
                lambda: search(eval_decode_config(self.cfg)), lambda: search(DecodeConfig(**OmegaConf.to_container(self.cfg.decode))),
                scale=len(self.data.valid_source_ids) / max(len(sample), 1),
            )
        plan = budget.plan_schedule(t, t.time_budget_minutes, costs).to_dict() if self.dist.main else None
        log.info("trainer.time_budget_minutes=%g: measured %s -> %s", t.time_budget_minutes, costs, plan)
        return share({**plan, "measured": vars(costs)} if plan else None, self.dist)

    # the loop ----------------------------------------------------------------------

    def train_step(self, group: list[list[Example]]) -> dict:
        """One optimizer update over ``group`` (update_freq batches); see step.update."""
        batches = [collate(examples, self.model_cfg.pad_id).to(self.device) for examples in group]
        return update(self.net, self.model, self.optimizer, self.scaler, batches, t=self.cfg.trainer, precision=self.precision,
                      step=self.progress.step + 1, d_model=self.model_cfg.d_model, world=self.dist.world)

    def run(self) -> dict:
        t = self.cfg.trainer
        start = time.time() - self.progress.elapsed
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
        return {"step": self.progress.step, "best_valid_bleu": self.progress.best_bleu, "best_step": self.progress.best_step,
                "minutes": (time.time() - start) / 60, "interrupted": self.interrupted}

    def on_signal(self, signum: int) -> None:
        self.stop_signal = signum

    def after_update(self, stats: dict, start: float) -> str:
        """Count the update, log, then validate and save when due; why to stop ("" to go on)."""
        t = self.cfg.trainer
        self.progress.step += 1
        self.progress.elapsed = time.time() - start
        self.window["tokens"] += stats["tokens"]
        step = self.progress.step
        self.runlog.tick()
        if step % t.log_every == 0 or step == 1:
            now = time.time()
            stats["tokens_per_s"] = self.window["tokens"] / max(now - self.window["time"], 1e-9)
            self.window = {"tokens": 0, "time": now}
            self.log_train(stats)
        stop = stop_reason(t, step, start, self.stop_signal is not None, self.dist, self.device)
        if stop == "signal":  # save at once: no validation when the machine is being taken away
            log.warning("received signal %d: saved a checkpoint at step %d; continue with trainer.resume=%s", self.stop_signal or 0, step, self.run_dir)
            self.interrupted = True
            self.save()
        elif step % t.eval_every == 0 or stop:
            best = self.validate()
            if t.patience > 0 and self.progress.evals_without_gain >= t.patience:
                log.info("early stop: no better validation BLEU in %d evaluations (best %.2f at step %d)", t.patience, self.progress.best_bleu, self.progress.best_step)
                stop = "patience"
            self.save(best=best)
        elif t.save_every and step % t.save_every == 0:
            self.save()
        return stop

    def end_epoch(self) -> str:
        """Move to the next epoch; "epochs" once trainer.max_epochs are done (validated and saved)."""
        if self.progress.batch_in_epoch == 0:
            raise UserError(f"data.max_tokens={self.cfg.data.max_tokens} gives no batches for {self.dist.world} processes")
        self.progress.epoch += 1
        self.progress.batch_in_epoch = 0
        if self.cfg.trainer.max_epochs and self.progress.epoch >= self.cfg.trainer.max_epochs:
            self.save(best=self.validate())
            return "epochs"
        return ""

    def guard(self, stats: dict) -> bool:
        """False for a NaN/inf step (skipped); stop after trainer.max_bad_steps in a row,
        keeping the weights from before the problem."""
        if stats["finite"] or self.precision == "fp16" and math.isfinite(stats["loss"]):
            self.bad_steps = 0
            return True
        self.bad_steps += 1
        log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s): update skipped", self.progress.step + 1, stats["loss"], stats["grad_norm"])
        if self.bad_steps >= self.cfg.trainer.max_bad_steps:
            self.save()
            raise UserError(
                f"{self.bad_steps} consecutive non-finite steps after step {self.progress.step}: stopped; weights from before "
                f"the problem are in {self.ckpt_dir / 'last.pt'} (lower trainer.lr, or use fp32/bf16)"
            )
        return False

    # logging, validation, checkpoints ----------------------------------------------

    def log_train(self, stats: dict) -> None:
        record = {"step": self.progress.step, "epoch": self.progress.epoch, "minutes": round(self.progress.elapsed / 60, 3)}
        record.update({k: stats[k] for k in TRAIN_KEYS})
        if self.device.type == "cuda":
            record["peak_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.runlog.log("train", record)
        self.runlog.progress(record)

    def validate(self) -> bool:
        """Validation NLL and BLEU on rank 0; returns whether this is the best BLEU so far
        (the same answer on every rank)."""
        if self.dist.main:
            p = self.progress
            nll = valid_loss(self.model, self.data.valid_examples, self.cfg.data.max_tokens, self.device, self.precision)
            bleu, texts = valid_bleu(self.model, self.tokenizer, self.data.valid_source_ids, self.data.valid_refs, eval_decode_config(self.cfg))
            if bleu > p.best_bleu:
                p.best_bleu, p.best_step, p.evals_without_gain = bleu, p.step, 0
            else:
                p.evals_without_gain += 1
            record = valid_record(p.step, p.elapsed / 60, nll, bleu)
            self.runlog.log("valid", record, samples_text(self.data.valid_sources, self.data.valid_refs, texts))
            log.info("step %d: valid nll %.4f ppl %.2f BLEU %.2f (best %.2f at step %d)", p.step, nll, record["valid_ppl"], bleu, p.best_bleu, p.best_step)
        self.progress = Progress(**share(vars(self.progress), self.dist))
        return self.progress.best_step == self.progress.step and self.progress.evals_without_gain == 0

    def save(self, best: bool = False) -> None:
        """Checkpoints of this step (see state.write_checkpoints); a collective under DDP."""
        ckpt = training_checkpoint(model=self.model, model_cfg=self.model_cfg, tokenizer=self.tokenizer, optimizer=self.optimizer,
                                   scaler=self.scaler, progress=self.progress, rngs=all_rng_states(self.dist), cfg=self.cfg)
        if self.dist.main:
            write_checkpoints(ckpt, self.ckpt_dir, self.progress.step, best, self.cfg.trainer)

    def finish(self, test: Optional[TestFn] = None) -> dict:
        """Averaging, then ``test`` (evaluate.py's scoring) on the best or averaged checkpoint."""
        t = self.cfg.trainer
        if not self.dist.main or self.interrupted:  # stopped by a signal: leave the run as it is, ready to resume
            return {}
        final = average_last(self.ckpt_dir, t.average_last) if t.average_last > 1 else self.ckpt_dir / "best.pt"
        if test is not None and self.cfg.evaluate_test and final.exists():
            return {"test": test(final, self.device)}
        return {}


def train(cfg: Any, test: Optional[TestFn] = None) -> dict:
    """Train with a composed config (``TrainConfig`` node); returns the run's metrics, with
    ``test``'s scores of the final checkpoint (``transformer.train`` passes evaluate's)."""
    if not cfg.run_dir:
        raise UserError("run_dir must be set (the CLI sets it to Hydra's output directory)")
    if cfg.trainer.resume and Path(cfg.trainer.resume).is_dir():
        cfg.run_dir = str(Path(cfg.trainer.resume).expanduser())
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, budget.clock())
    metrics = trainer.run()
    metrics.update(trainer.finish(test))
    metrics.update(run_dir=str(trainer.run_dir), precision=trainer.precision, hardware=detect().to_dict())
    if trainer.progress.plan:
        metrics["budget_plan"] = trainer.progress.plan
    if trainer.dist.main:
        write_results(trainer.run_dir, metrics)
    finish_distributed()
    return metrics
