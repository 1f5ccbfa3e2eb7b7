"""Synthetic training pairs mixed with a corpus: a teacher's translations of its sources
(sequence-level distillation, Kim & Rush 2016: ``data.distilled_file``) and back-translations
of target-language text (Sennrich et al. 2016: ``data.bt_file``), each back-translated source
opened by a tag (``data.bt_tag``, Caswell et al. 2019) so the model can tell them apart.

The files are written by transformer-distill (distill.py); here they are only read and mixed,
deterministically, so a resumed run sees the same pairs in the same order.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

from transformer.config import DataConfig
from transformer.data.corpus import Pair, clean_pairs, read_tsv
from transformer.errors import UserError

log = logging.getLogger(__name__)
SEED = 20190  # which pairs a ratio keeps: fixed, so every run on the same files trains on the same mix


def uses_synthetic(cfg: DataConfig) -> bool:
    return bool(cfg.distilled_file or cfg.bt_file)


def sample(pairs: Sequence[Pair], n: int) -> list[Pair]:
    """``n`` of ``pairs`` (all of them when n >= len), in their order."""
    if n >= len(pairs):
        return list(pairs)
    keep = sorted(random.Random(SEED).sample(range(len(pairs)), max(n, 0)))
    return [pairs[i] for i in keep]


def tsv_pairs(path: str, key: str) -> list[Pair]:
    try:
        return clean_pairs(list(read_tsv(path)), key)
    except FileNotFoundError:
        raise UserError(f"{key}={path}: no such file") from None


def with_synthetic(cfg: DataConfig, pairs: list[Pair]) -> list[Pair]:
    """The training pairs of a run with synthetic ones: the teacher's pairs (replacing the
    corpus's but for a share ``data.original_ratio`` of them), then the back-translated ones
    (``data.bt_ratio`` per original pair), their sources tagged."""
    for key in ("original_ratio", "bt_ratio"):
        if getattr(cfg, key) < 0:
            raise UserError(f"data.{key}={getattr(cfg, key)} must be >= 0")
    refuse_synthetic_with(cfg, "data.streaming" if cfg.streaming else "")
    mixed = pairs
    if cfg.distilled_file:
        distilled = tsv_pairs(cfg.distilled_file, "data.distilled_file")
        mixed = distilled + sample(pairs, round(cfg.original_ratio * len(pairs)))
        log.info(
            "distillation: %d teacher pairs + %d of %d original ones",
            len(distilled),
            len(mixed) - len(distilled),
            len(pairs),
        )
    if cfg.bt_file:
        back = sample(tsv_pairs(cfg.bt_file, "data.bt_file"), round(cfg.bt_ratio * len(pairs)))
        tag = f"{cfg.bt_tag} " if cfg.bt_tag else ""
        mixed = mixed + [(tag + s, t) for s, t in back]
        log.info("back-translation: %d synthetic pairs%s", len(back), f" tagged {cfg.bt_tag}" if tag else "")
    return mixed


def refuse_synthetic_with(cfg: DataConfig, feature: str) -> None:
    """One error line when synthetic pairs meet a ``feature`` that reads the corpus otherwise."""
    if feature and uses_synthetic(cfg):
        raise UserError(f"data.distilled_file and data.bt_file need one corpus read into memory, not {feature}")


def user_symbols(cfg: DataConfig) -> list[str]:
    """Pieces BPE must keep whole for this corpus: the back-translation tag."""
    return [cfg.bt_tag] if cfg.bt_file and cfg.bt_tag else []
