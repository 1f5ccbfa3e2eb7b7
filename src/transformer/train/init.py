"""``trainer.init_from``: start a run from a checkpoint's weights and tokenizer (an imported
pretrained model or any earlier run), with a fresh optimizer, schedule and progress.

The model config comes from the checkpoint: the composed ``model.*`` values are replaced by
it, and a ``model.KEY=VALUE`` given on the command line that contradicts it is an error
naming the key. Regularisation (the dropout rates) may be changed for the new run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from transformer.checkpoint import load_checkpoint, resolve_checkpoint
from transformer.config import ModelConfig
from transformer.errors import UserError, first_line

REGULARISATION = ("dropout", "attention_dropout", "activation_dropout", "src_word_dropout", "tgt_word_dropout")


def command_line_overrides() -> list[str]:
    """The overrides Hydra was given (``[]`` when train() runs outside the console script)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def model_keys(overrides: Sequence[str]) -> list[str]:
    """The ``model.KEY`` names set by ``model.KEY=VALUE`` overrides (``+``/``++`` prefixes too)."""
    keys = []
    for item in overrides:
        name = item.split("=", 1)[0].lstrip("+~")
        if name.startswith("model."):
            keys.append(name.removeprefix("model."))
    return keys


def apply_init_from(cfg: Any, overrides: Sequence[str] | None = None) -> tuple[Path, dict] | None:
    """Load ``trainer.init_from`` and make ``cfg.model`` its model config; returns (path,
    checkpoint), or None without init_from. ``overrides``: the command line (default: Hydra's)."""
    target = cfg.trainer.init_from
    if not target:
        return None
    path = resolve_checkpoint(str(target))
    ckpt = load_checkpoint(path)
    saved = asdict(ModelConfig(**ckpt["model_config"]))  # older checkpoints: new keys get their defaults
    given = model_keys(command_line_overrides() if overrides is None else overrides)
    for key in given:
        if key in REGULARISATION or key not in saved:
            continue
        if getattr(cfg.model, key) != saved[key]:
            raise UserError(
                f"model.{key}={getattr(cfg.model, key)} contradicts trainer.init_from={target}, whose model has {key}={saved[key]} "
                "(the model config comes from the checkpoint: drop the override)"
            )
    for key, value in saved.items():
        if key not in given or key not in REGULARISATION:
            setattr(cfg.model, key, value)
    return path, ckpt


def load_init_weights(model: nn.Module, init: tuple[Path, dict]) -> None:
    """The checkpoint's weights into the freshly built ``model``."""
    path, ckpt = init
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(
            f"trainer.init_from={path}: weights do not fit its own model config ({first_line(e)})"
        ) from None
