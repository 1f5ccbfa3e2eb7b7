"""Checkpoints: written atomically, read without executing pickled code.

A checkpoint is a plain dict of tensors, numbers, strings and bytes: model weights,
the model config and the tokenizer (so decode needs nothing else), and, for resuming,
optimizer (the schedule is a pure function of the step), scaler, RNG states and the position in the epoch.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import torch

from transformer.config import ENUMS, ModelConfig
from transformer.data.tokenizer import Tokenizer
from transformer.errors import UserError, first_line
from transformer.model import Transformer, build_model
from transformer.rundir import atomic_file

log = logging.getLogger(__name__)

FORMAT = "transformer-checkpoint-v1"
CHECKPOINT_DIR = "checkpoints"


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through rundir.atomic_file: a crash leaves either the old file or the new
    one, never half of one; a full disk is one error line naming ``path``."""
    with atomic_file(path) as f:
        torch.save(obj, f)


def load_checkpoint(path: Path | str, mmap: bool = False) -> dict:
    """The checkpoint dict; a clear error for a missing, truncated or foreign file. ``mmap``:
    tensors stay in the file (memory-mapped) until something reads them."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut-off one has lost its directory
        raise UserError(
            f"{path}: not a readable checkpoint: {path.stat().st_size} bytes that are not a PyTorch checkpoint archive "
            f"(a file cut short by a crash, or another kind of file)"
        )
    try:
        with torch.serialization.safe_globals(list(ENUMS)):  # configs saved with their enum members
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise UserError(
            f"{path}: not a readable checkpoint: a PyTorch archive whose contents are damaged or foreign ({first_line(e)})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a checkpoint written by this package (expected format {FORMAT})")
    return ckpt


def resolve_checkpoint(path: str, name: str = "best.pt") -> Path:
    """A checkpoint file, or ``name`` inside a run directory's checkpoints/ folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        candidate = p / CHECKPOINT_DIR / name
        if not candidate.is_file():
            raise UserError(f"{p}: run directory holds no {CHECKPOINT_DIR}/{name}")
        return candidate
    return p


def model_from_checkpoint(
    ckpt: dict, tokenizer: Tokenizer | None = None, weights: bool = True
) -> tuple[Transformer, Tokenizer]:
    """Rebuild the model and its tokenizer. A tokenizer given separately must have the
    vocabulary the model was trained with. ``weights=False``: the model's shape only, its
    parameters on the meta device (no memory, nothing read)."""
    cfg = ModelConfig(**ckpt["model_config"])
    tok = tokenizer or Tokenizer.from_state(ckpt["tokenizer"])
    if (tok.src_vocab_size, tok.tgt_vocab_size) != (cfg.src_vocab_size, cfg.tgt_vocab_size):
        raise UserError(
            f"tokenizer vocabulary ({tok.src_vocab_size} source / {tok.tgt_vocab_size} target pieces) does not match "
            f"the checkpoint's model ({cfg.src_vocab_size} / {cfg.tgt_vocab_size}): use the tokenizer saved with that run"
        )
    if tokenizer is not None and tokenizer.to_state() != ckpt["tokenizer"]:
        raise UserError(
            "tokenizer differs from the one saved in the checkpoint (same size, other pieces): use the run's own tokenizer"
        )
    if not weights:
        with torch.device("meta"):
            return build_model(cfg), tok
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    return model, tok


def load_model(
    path: str | Path, tokenizer: Tokenizer | None = None, weights: bool = True
) -> tuple[Transformer, Tokenizer, dict]:
    """(model in eval mode, tokenizer, the checkpoint's training config) of a checkpoint file
    or run directory (its best.pt); ``tokenizer``: the one an ensemble member must share.
    ``weights=False``: the weights stay on disk and the model is its shape (meta device)."""
    ckpt = load_checkpoint(resolve_checkpoint(str(path)), mmap=not weights)
    model, tok = model_from_checkpoint(ckpt, tokenizer, weights)
    return model.eval(), tok, ckpt.get("config", {})


def list_step_checkpoints(directory: Path) -> list[Path]:
    """step_*.pt files, oldest first."""
    return sorted(directory.glob("step_*.pt"))


def checkpoint_step(path: Path) -> int:
    """The update count in a step checkpoint's name (``step_00004000.pt`` -> 4000)."""
    return int(path.stem.removeprefix("step_"))


def newest_valid_checkpoint(directory: Path) -> tuple[Path, dict] | None:
    """``last.pt`` if it loads, else the newest step checkpoint that does (with a warning)."""
    candidates = [directory / "last.pt"] + list(reversed(list_step_checkpoints(directory)))
    for path in candidates:
        if not path.exists():
            continue
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            log.warning("skipping unreadable checkpoint: %s", e)
    return None


def average_checkpoints(paths: list[Path]) -> dict:
    """The first checkpoint with its model weights replaced by the mean over ``paths``."""
    if not paths:
        raise UserError("no checkpoints to average")
    first = load_checkpoint(paths[0])
    total = {k: v.double() if v.is_floating_point() else v for k, v in first["model"].items()}
    for path in paths[1:]:
        weights = load_checkpoint(path)["model"]
        if weights.keys() != total.keys():
            raise UserError(f"{path}: model weights do not match {paths[0]} (different architecture)")
        for k, v in weights.items():
            if v.is_floating_point():
                total[k] += v.double()
    first["model"] = {
        k: (v / len(paths)).to(first["model"][k].dtype) if v.is_floating_point() else v for k, v in total.items()
    }
    first["averaged_from"] = [str(p) for p in paths]
    return first
