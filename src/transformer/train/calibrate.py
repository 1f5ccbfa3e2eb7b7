"""The time budget's measurements on the run's own model: a few updates, one validation and
a sample of the test search, timed at start-up and then undone (see budget.py)."""

from __future__ import annotations

import itertools
import logging
from typing import Any

from transformer.config import DecodeConfig
from transformer.data.batching import chunked
from transformer.decode.batching import translate_ids
from transformer.train import budget
from transformer.train.distributed import share
from transformer.train.state import throwaway
from transformer.train.step import host_stats
from transformer.train.validation import eval_decode_config, valid_loss

log = logging.getLogger(__name__)


def plan_budget(trainer: Any, started: float) -> dict:
    """Fit the schedule to trainer.time_budget_minutes from updates and searches timed now,
    then undone: the run is the one an unbudgeted run with the plan would be. ``trainer`` is
    the Trainer being set up (its model, optimizer, data and train_step)."""
    cfg, data, model = trainer.cfg, trainer.data, trainer.model
    t, sample = cfg.trainer, data.valid_source_ids[:64]
    wanted = sum(len(e.tgt) - 1 for e in data.valid_examples[: len(sample)])  # reference subwords + EOS

    def search(decode_cfg: DecodeConfig) -> float:
        return budget.search_seconds(
            lambda: [len(h[0].tokens) for h in translate_ids([model], sample, decode_cfg)], wanted
        )

    with throwaway(model, trainer.optimizer, trainer.scaler):
        costs = budget.measure_costs(
            started,
            lambda group: host_stats(trainer.train_step(group)),  # read: deferred metrics would not wait for the GPU
            list(itertools.islice(chunked(data.epoch_batches(0), t.update_freq), 13)),
            lambda: valid_loss(model, data.valid_examples, cfg.data.max_tokens, trainer.device, trainer.precision),
            lambda: search(eval_decode_config(cfg)),
            lambda: search(cfg.decode),
            scale=len(data.valid_source_ids) / max(len(sample), 1),
        )
    plan = budget.plan_schedule(t, t.time_budget_minutes, costs) if trainer.dist.main else None
    if plan is not None:
        note = (
            "trainer.time_budget_minutes=%g: start-up %.1f min, one update %.2f s, one validation %.1f s, test %.1f s"
        )
        log.info(note, t.time_budget_minutes, costs.spent / 60, costs.step, costs.evaluation, costs.test)
        log.info("%s", plan.line())
    return share({**plan.to_dict(), "measured": vars(costs)} if plan else None, trainer.dist)
