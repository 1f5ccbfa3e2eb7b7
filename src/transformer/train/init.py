"""``trainer.init_from``: start a run from a checkpoint's weights and tokenizer (an imported
pretrained model or any earlier run), with a fresh optimizer, schedule and progress.

The model config comes from the checkpoint: the composed ``model.*`` values are replaced by
it, and a ``model.KEY=VALUE`` given on the command line that contradicts it is an error
naming the key. Regularisation (the dropout rates) may be changed for the new run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from torch import nn

from transformer.checkpoint import load_checkpoint, resolve_checkpoint
from transformer.config import ModelConfig, TrainConfig
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


def init_from(cfg: TrainConfig, overrides: Sequence[str] | None = None) -> tuple[tuple[Path, dict] | None, ModelConfig]:
    """(path, checkpoint) of ``trainer.init_from`` and the model config the run takes: the
    checkpoint's, with the regularisation ``overrides`` gave (default: Hydra's command line);
    without init_from, (None, cfg.model). The run's config is rebuilt with it, never edited."""
    target = cfg.trainer.init_from
    if not target:
        return None, cfg.model
    path = resolve_checkpoint(str(target))
    ckpt = load_checkpoint(path)
    saved = ModelConfig(**ckpt["model_config"])  # older checkpoints: new keys get their defaults
    given = model_keys(command_line_overrides() if overrides is None else overrides)
    for key in given:
        if key in REGULARISATION or not hasattr(saved, key):
            continue
        if getattr(cfg.model, key) != getattr(saved, key):
            raise UserError(
                f"model.{key}={getattr(cfg.model, key)} contradicts trainer.init_from={target}, whose model has "
                f"{key}={getattr(saved, key)} (the model config comes from the checkpoint: drop the override)"
            )
    kept = {key: getattr(cfg.model, key) for key in given if key in REGULARISATION}
    return (path, ckpt), replace(saved, **kept)


def load_init_weights(model: nn.Module, init: tuple[Path, dict]) -> None:
    """The checkpoint's weights into the freshly built ``model``."""
    path, ckpt = init
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(
            f"trainer.init_from={path}: weights do not fit its own model config ({first_line(e)})"
        ) from None
