"""What a resumed run may change: its settings checked against the config stored in the
checkpoint, so that "resume" means the same run continued exactly.

A key in FREE may change at will: it does not touch the numbers the run computes (logging,
threads, where files go, how the same arithmetic is scheduled) or only says where to stop.
Any other change is refused with the keys listed (``key: old -> new``) unless
``trainer.resume_allow`` names it; accepted changes are recorded in metrics.jsonl (a record
with ``resume_changes``) and the run card. docs/runs.md lists both sides.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformer.config import TrainConfig, to_dict
from transformer.errors import UserError
from transformer.rundir import RESUME_CHANGES

log = logging.getLogger(__name__)

# keys a resumed run may change freely (the allow-list; everything else must match the checkpoint's config)
FREE = frozenset(
    {
        "run_dir",  # where the run lives (a resume may name it by trainer.resume)
        "evaluate_test",  # the test scoring after training
        "trainer.resume",
        "trainer.resume_allow",
        "trainer.init_from",  # resume wins over it: weights, tokenizer and progress come from the checkpoint
        "trainer.device",  # the same arithmetic elsewhere (other hardware may round differently)
        "trainer.threads",
        "trainer.compile",
        "trainer.onednn_linear",
        "trainer.keep_freed_memory",
        "trainer.progress",
        "trainer.loggers",
        "trainer.log_every",
        "trainer.save_every",
        "trainer.keep_last",
        "trainer.keep_every",
        "trainer.max_epochs",  # stop conditions: the run continues exactly and stops elsewhere
        "trainer.max_minutes",
        "trainer.patience",
        "data.name",  # a label
        "data.cache",  # where and how the same token ids are stored
        "data.cache_dir",
        "data.encode_workers",
        "data.test_src",  # the test split is read after training
        "data.test_tgt",
        "data.test_file",
        "data.test_split",
        "decode.batch_tokens",  # the same search in other batches
        "decode.prepack",
    }
)
# stop conditions that also shape the learning rate under some schedules
SCHEDULED = {"trainer.max_steps": ("cosine",)}


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"trainer.lr": 5e-4, ...}``: the dotted keys of a nested config dict."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def is_free(key: str, now: dict[str, Any]) -> bool:
    """Whether ``key`` may change on resume (max_steps: unless the schedule depends on it)."""
    if key in SCHEDULED:
        return now.get("trainer.schedule") not in SCHEDULED[key]
    return key in FREE


def changed_settings(saved: dict, cfg: TrainConfig, planned: dict | None = None) -> dict[str, tuple[Any, Any]]:
    """``key -> (old, new)`` for each setting of ``cfg`` that differs from the ``saved``
    config and may not change freely. Keys the checkpoint lacks (an older version) and
    the trainer keys a time budget's ``planned`` (reapplied from the checkpoint) are skipped."""
    old, now = flatten(saved), flatten(to_dict(cfg))
    skip = {f"trainer.{k}" for k in planned or {}}
    return {
        key: (old[key], value)
        for key, value in now.items()
        if key in old and old[key] != value and key not in skip and not is_free(key, now)
    }


def listed(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key}: {old} -> {new}" for key, (old, new) in changes.items())


def check_resume(cfg: TrainConfig, resume: tuple[Path, dict] | None) -> dict[str, tuple[Any, Any]]:
    """The changes ``trainer.resume_allow`` accepts; a UserError listing any other change
    from the checkpoint's config, or naming an allowed key that does not exist."""
    if resume is None:
        return {}
    path, ckpt = resume
    allow = list(cfg.trainer.resume_allow)
    known = flatten(to_dict(cfg))
    if unknown := [key for key in allow if key not in known]:
        raise UserError(f"trainer.resume_allow: no setting named {', '.join(unknown)} (give dotted keys: trainer.lr)")
    changes = changed_settings(ckpt.get("config", {}), cfg, ckpt["progress"].get("plan"))
    if refused := {key: change for key, change in changes.items() if key not in allow}:
        raise UserError(
            f"trainer.resume={cfg.trainer.resume}: settings differ from those {path} was trained with, so the run would "
            f"not continue exactly: {listed(refused)} (give the same settings, or accept the change with "
            f"trainer.resume_allow=[{','.join(refused)}])"
        )
    if changes:
        log.warning("resuming with changed settings (trainer.resume_allow): %s", listed(changes))
    return changes


def changes_record(step: int, changes: dict[str, tuple[Any, Any]]) -> dict:
    """The metrics.jsonl record of the settings a resume changed (logged after its truncation to ``step``)."""
    return {"step": step, RESUME_CHANGES: {k: list(v) for k, v in changes.items()}}
