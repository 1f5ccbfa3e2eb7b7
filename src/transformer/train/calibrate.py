"""The time budget's measurements on the run's own model: a few updates, one validation and
a sample of the test search, timed at start-up and then undone (see budget.py)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import torch

from transformer.config import DecodeConfig, TrainConfig
from transformer.data.batching import chunked
from transformer.decode.batching import translate_ids
from transformer.model import Transformer
from transformer.train import budget
from transformer.train.build import Runtime
from transformer.train.distributed import share
from transformer.train.examples import RunData
from transformer.train.state import throwaway
from transformer.train.step import host_stats
from transformer.train.validation import eval_decode_config, valid_loss

log = logging.getLogger(__name__)


def plan_budget(
    cfg: TrainConfig,
    data: RunData,
    parts: tuple[Transformer, torch.optim.Optimizer, torch.amp.GradScaler],
    train_step: Callable[[list], dict],
    rt: Runtime,
    started: float,
) -> dict | None:
    """Fit the schedule to trainer.time_budget_minutes from updates (``train_step`` on the
    model, optimizer and scaler in ``parts``) and searches timed now, then undone: the run is
    the one an unbudgeted run with the plan would be. The plan and what was measured, as
    ``Progress.plan`` stores them (None on ranks other than 0 before they are shared)."""
    model, optimizer, scaler = parts
    t, sample = cfg.trainer, data.valid_source_ids[:64]
    wanted = sum(len(e.tgt) - 1 for e in data.valid_examples[: len(sample)])  # reference subwords + EOS

    def search(decode_cfg: DecodeConfig) -> float:
        return budget.search_seconds(
            lambda: [len(h[0].tokens) for h in translate_ids([model], sample, decode_cfg)], wanted
        )

    with throwaway(model, optimizer, scaler):
        costs = budget.measure_costs(
            started,
            lambda group: host_stats(train_step(group)),  # read: deferred metrics would not wait for the GPU
            list(itertools.islice(chunked(data.epoch_batches(0), t.update_freq), 13)),
            lambda: valid_loss(model, data.valid_examples, cfg.data.max_tokens, rt.device, rt.precision),
            lambda: search(eval_decode_config(cfg)),
            lambda: search(cfg.decode),
            scale=len(data.valid_source_ids) / max(len(sample), 1),
        )
    plan = budget.plan_schedule(t, t.time_budget_minutes, costs) if rt.dist.main else None
    if plan is not None:
        note = (
            "trainer.time_budget_minutes=%g: start-up %.1f min, one update %.2f s, one validation %.1f s, test %.1f s"
        )
        log.info(note, t.time_budget_minutes, costs.spent / 60, costs.step, costs.evaluation, costs.test)
        log.info("%s", plan.line())
    return share({**plan.to_dict(), "measured": vars(costs)} if plan else None, rt.dist)
