"""Where a run stands and what its checkpoints hold: finding the one to resume from,
writing and rotating them, and putting a run back where one left off."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformer.checkpoint import (
    CHECKPOINT_DIR,
    FORMAT,
    atomic_save,
    average_checkpoints,
    checkpoint_step,
    list_step_checkpoints,
    load_checkpoint,
    newest_valid_checkpoint,
    resolve_checkpoint,
)
from transformer.config import ModelConfig, TrainConfig, TrainerConfig, to_dict
from transformer.errors import UserError, first_line
from transformer.train.distributed import Dist, rng_state, set_rng_state
from transformer.train.ema import EMA

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    step: int = 0  # optimizer updates done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch (this rank's shard) already consumed
    best_bleu: float = -1.0
    best_step: int = 0
    evals_without_gain: int = 0
    elapsed: float = 0.0  # training seconds before this process started
    plan: dict | None = (
        None  # trainer.time_budget_minutes: the current budget.Plan (revised at each evaluation), start-up costs under measured
    )


def find_resume(target: str | None) -> tuple[Path, dict] | None:
    """The checkpoint ``trainer.resume`` names (a run directory or file); a run directory
    falls back to its newest readable checkpoint."""
    if not target:
        return None
    p = Path(target).expanduser()
    if p.is_dir():
        found = newest_valid_checkpoint(p / CHECKPOINT_DIR)
        if found is None:
            raise UserError(f"trainer.resume={target}: no readable checkpoint in {p / CHECKPOINT_DIR}")
        if found[0].name != "last.pt":
            log.warning("resuming from %s (last.pt was missing or unreadable)", found[0])
        return found
    path = resolve_checkpoint(str(p), "last.pt")
    return path, load_checkpoint(path)


def training_checkpoint(
    *,
    model: Any,
    model_cfg: ModelConfig,
    tokenizer: Any,
    optimizer: Any,
    scaler: Any,
    progress: Progress,
    rngs: list[dict],
    cfg: TrainConfig,
    ema: EMA | None = None,
) -> dict:
    """Everything a resumed run needs, and what decoding needs (model, its config, tokenizer).
    With an ``ema``, "model" holds its averages (what decoding loads) and "train_model" the
    trained weights (what a resumed run continues from)."""
    trained = {} if ema is None else {"train_model": model.state_dict()}
    return {
        "format": FORMAT,
        "model": model.state_dict() if ema is None else ema.state_dict(model),
        **trained,
        "model_config": to_dict(model_cfg),  # plain values (enums as strings): weights_only loading reads them
        "tokenizer": tokenizer.to_state(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "progress": vars(progress).copy(),
        "rng": rngs,
        "world_size": len(rngs),
        "config": to_dict(cfg),
    }


def write_checkpoints(ckpt: dict, ckpt_dir: Path, step: int, best: bool, t: TrainerConfig) -> None:
    """last.pt and a step checkpoint, best.pt when best; keep the newest trainer.keep_last
    step checkpoints (or trainer.average_last, if more) and those at multiples of
    trainer.keep_every."""
    atomic_save(ckpt, ckpt_dir / "last.pt")  # first: a crash before the step file leaves last.pt the newest
    atomic_save(ckpt, ckpt_dir / f"step_{step:08d}.pt")
    if best:
        atomic_save(ckpt, ckpt_dir / "best.pt")
    for old in list_step_checkpoints(ckpt_dir)[: -max(t.keep_last, t.average_last, 1)]:
        if not (t.keep_every and checkpoint_step(old) % t.keep_every == 0):
            old.unlink(missing_ok=True)


def restore_training(
    path: Path,
    ckpt: dict,
    *,
    model: Any,
    optimizer: Any,
    scaler: Any,
    tokenizer: Any,
    dist: Dist,
    ema: EMA | None = None,
) -> Progress:
    """Load weights, optimizer, scaler, this rank's RNG state and the ``ema``'s averages from
    ``ckpt``; returns its progress. A checkpoint saved without an EMA starts the averages
    from its weights."""
    if ckpt["tokenizer"] != tokenizer.to_state():
        raise UserError(f"{path}: checkpoint vocabulary differs from the run's tokenizer")
    try:
        model.load_state_dict(ckpt.get("train_model", ckpt["model"]))
    except RuntimeError as e:
        differ = [
            f"model.{k}: {v} -> {getattr(model.cfg, k)}"
            for k, v in ckpt["model_config"].items()
            if k in vars(model.cfg) and getattr(model.cfg, k) != v
        ]
        raise UserError(
            f"{path}: the checkpoint's weights do not fit the model of this run: "
            f"{', '.join(differ) or first_line(e)} (a resumed run keeps its model)"
        ) from None
    if ema is not None:
        ema.load(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    progress = Progress(**ckpt["progress"])
    if ckpt["world_size"] == dist.world:
        set_rng_state(ckpt["rng"][dist.rank])
    else:
        # shards interleave, so the ranks together consumed the epoch's first world x position batches
        progress.batch_in_epoch = progress.batch_in_epoch * ckpt["world_size"] // dist.world
        log.warning(
            "resuming a %d-process run with %d processes: batches continue, dropout randomness differs",
            ckpt["world_size"],
            dist.world,
        )
    log.info(
        "resumed from %s at step %d (epoch %d, batch %d)", path, progress.step, progress.epoch, progress.batch_in_epoch
    )
    return progress


@contextlib.contextmanager
def throwaway(model: Any, optimizer: Any, scaler: Any) -> Iterator[None]:
    """Updates inside leave no trace: weights, optimizer, scaler and RNG are put back."""
    saved = (
        {k: v.clone() for k, v in model.state_dict().items()},
        copy.deepcopy(optimizer.state_dict()),
        scaler.state_dict(),
        rng_state(),
    )
    try:
        yield
    finally:
        model.load_state_dict(saved[0])
        optimizer.load_state_dict(saved[1])
        scaler.load_state_dict(saved[2])
        set_rng_state(saved[3])


def average_last(ckpt_dir: Path, n: int) -> Path:
    """``averaged.pt``: the mean of the newest ``n`` step checkpoints."""
    paths = list_step_checkpoints(ckpt_dir)[-n:]
    final = ckpt_dir / "averaged.pt"
    atomic_save(average_checkpoints(paths), final)
    log.info("averaged the weights of %s into %s", ", ".join(p.name for p in paths), final)
    return final
