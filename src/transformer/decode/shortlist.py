"""Vocabulary shortlists (``decode.shortlist``): per batch, the target tokens search may
produce, so the output projection and the softmax run over a few thousand rows instead of
the whole vocabulary (Marian's and CTranslate2's lexical shortlists).

A table holds, per source token, the ``k`` target tokens that co-occur with it most
strongly in the training data (by the Dice coefficient of their sentence counts,
2 c(s, t) / (c(s) + c(t)), which ranks translations above merely frequent words), and the
``frequent`` most frequent target tokens, kept for every batch. A batch's candidates are the
union of its source tokens' entries, the frequent tokens, EOS and any forced prefix or
constraint tokens; the softmax and search run over them only (``rules.Columns``), so no other
token can be produced.
``transformer-shortlist`` builds the table and stores it beside the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from transformer.checkpoint import atomic_save, resolve_checkpoint
from transformer.errors import UserError

FORMAT = "transformer-shortlist-v1"
FILENAME = "shortlist.pt"


@dataclass
class Shortlist:
    """A lexical table: ``table`` (source vocab, k) target ids (-1: none), ``frequent`` target ids."""

    table: Tensor
    frequent: Tensor
    tgt_vocab_size: int
    bleu_loss: float | None = None  # full vocabulary BLEU minus shortlist BLEU on the validation split

    def candidates(self, src: Tensor, required: Iterable[int] = ()) -> Tensor:
        """Sorted target ids (K,) a batch of sources src (B, S) may produce: its tokens' entries,
        the frequent tokens and ``required`` (EOS, prefix and constraint tokens)."""
        rows = self.table.to(src.device)[src.clamp(max=self.table.size(0) - 1).flatten()].flatten()
        extra = torch.tensor(sorted(set(required)), dtype=torch.long, device=src.device)
        ids = torch.cat([rows[rows >= 0].long(), self.frequent.to(src.device).long(), extra])
        return torch.unique(ids)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "table": self.table,
            "frequent": self.frequent,
            "tgt_vocab_size": self.tgt_vocab_size,
            "bleu_loss": self.bleu_loss,
        }


def sentence_pairs(src_ids: Sequence[list[int]], tgt_ids: Sequence[list[int]], tgt_size: int) -> np.ndarray:
    """Each (source token, target token) pair of distinct tokens sharing a sentence, as s * tgt_size + t."""
    codes = []
    for s, t in zip(src_ids, tgt_ids):
        su, tu = np.unique(np.asarray(s, dtype=np.int64)), np.unique(np.asarray(t, dtype=np.int64))
        codes.append((su[:, None] * tgt_size + tu[None, :]).ravel())
    return np.concatenate(codes) if codes else np.zeros(0, dtype=np.int64)


def build_shortlist(
    src_ids: Sequence[list[int]],
    tgt_ids: Sequence[list[int]],
    src_size: int,
    tgt_size: int,
    k: int = 50,
    frequent: int = 100,
    never: Iterable[int] = (),
) -> Shortlist:
    """The table of parallel id lists: per source token its ``k`` best targets by Dice, and the
    ``frequent`` most frequent targets; tokens of ``never`` (PAD, BOS) are left out."""
    if k < 1 or frequent < 0:
        raise UserError(f"k={k} must be >= 1 and frequent={frequent} >= 0")
    pair, count = np.unique(sentence_pairs(src_ids, tgt_ids, tgt_size), return_counts=True)
    src_count = np.bincount(np.concatenate([np.unique(s) for s in src_ids]), minlength=src_size)
    tgt_count = np.bincount(np.concatenate([np.unique(t) for t in tgt_ids]), minlength=tgt_size)
    s, t = pair // tgt_size, pair % tgt_size
    dice = 2 * count / (src_count[s] + tgt_count[t])
    keep = ~np.isin(t, list(never))
    s, t, dice = s[keep], t[keep], dice[keep]
    order = np.lexsort((-dice, s))  # by source token, best first
    s, t = s[order], t[order]
    rank = np.arange(len(s)) - np.searchsorted(s, s, side="left")  # position within its source token
    table = np.full((src_size, k), -1, dtype=np.int32)
    first = rank < k
    table[s[first], rank[first]] = t[first]
    tokens = np.bincount(np.concatenate([np.asarray(x, dtype=np.int64) for x in tgt_ids]), minlength=tgt_size)
    tokens[list(never)] = 0
    top = np.argsort(-tokens, kind="stable")[:frequent]
    return Shortlist(torch.from_numpy(table), torch.from_numpy(top[tokens[top] > 0].astype(np.int64)), tgt_size)


def beside(checkpoint: str | Path) -> Path:
    """Where a checkpoint's shortlist lives: shortlist.pt in the checkpoint's folder."""
    return resolve_checkpoint(str(checkpoint)).parent / FILENAME


def save_shortlist(shortlist: Shortlist, path: Path) -> None:
    atomic_save(shortlist.to_dict(), path)


def load_shortlist(path: str | Path, tgt_vocab_size: int, key: str = "decode.shortlist") -> Shortlist:
    """A table written by ``transformer-shortlist``, checked against the model's target vocabulary."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}={path}: file not found (build one with transformer-shortlist checkpoint=RUN)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        data = None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{key}={path}: not a shortlist written by transformer-shortlist")
    if data["tgt_vocab_size"] != tgt_vocab_size:
        raise UserError(
            f"{key}={path}: built for a target vocabulary of {data['tgt_vocab_size']}, the model has {tgt_vocab_size}"
        )
    return Shortlist(data["table"], data["frequent"], data["tgt_vocab_size"], data.get("bleu_loss"))
