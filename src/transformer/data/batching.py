"""Token-budget batches, bucketed by length, and the one place a batch is built.

Batches of an epoch are a pure function of (lengths, budget, seed, epoch), so a resumed
run rebuilds exactly the batches it was going through and skips the ones it has done.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from transformer.vocab import PAD

log = logging.getLogger(__name__)


@dataclass
class Example:
    src: list[int]  # pieces + EOS
    tgt: list[int]  # BOS + pieces + EOS


@dataclass
class Batch:
    src: Tensor  # (B, S) right-padded with PAD
    tgt_in: Tensor  # (B, T) BOS + pieces
    tgt_out: Tensor  # (B, T) pieces + EOS
    n_tokens: int  # target tokens that count in the loss
    pad_id: int = PAD  # the padding id (an imported model's own)

    def to(self, device: torch.device) -> "Batch":
        nb = device.type == "cuda"
        return Batch(self.src.to(device, non_blocking=nb), self.tgt_in.to(device, non_blocking=nb), self.tgt_out.to(device, non_blocking=nb), self.n_tokens, self.pad_id)


def encode_examples(src_ids: Sequence[list[int]], tgt_ids: Sequence[list[int]], max_len: int, name: str) -> list[Example]:
    """Pair up encoded sentences, dropping (and counting) pairs longer than ``max_len``."""
    examples = [Example(s, t) for s, t in zip(src_ids, tgt_ids) if len(s) <= max_len and len(t) <= max_len]
    dropped = len(src_ids) - len(examples)
    if dropped:
        log.warning("%s: dropped %d of %d pairs longer than data.max_len=%d subwords", name, dropped, len(src_ids), max_len)
    return examples


def pad(seqs: Sequence[Sequence[int]], pad_id: int = PAD) -> Tensor:
    """Right-pad to the longest sequence: (B, L) int64."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def collate(examples: Sequence[Example], pad_id: int = PAD) -> Batch:
    src = pad([e.src for e in examples], pad_id)
    tgt = pad([e.tgt for e in examples], pad_id)
    return Batch(src=src, tgt_in=tgt[:, :-1], tgt_out=tgt[:, 1:], n_tokens=sum(len(e.tgt) - 1 for e in examples), pad_id=pad_id)


def token_batches(lengths: Sequence[tuple[int, int]], max_tokens: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Indices grouped so that each batch's padded size (rows x longest side) stays within
    ``max_tokens``. Examples are sorted by length (random tie-break per epoch) so batches
    hold similar lengths; batch order is shuffled per epoch. Every index appears once."""
    rng = random.Random(seed * 100003 + epoch)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    order.sort(key=lambda i: (lengths[i][0], lengths[i][1]))  # stable: shuffle breaks ties
    batches, current, longest = [], [], 0
    for i in order:
        size = max(lengths[i])
        if current and max(longest, size) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, size)
    if current:
        batches.append(current)
    if shuffle:
        rng.shuffle(batches)
    return batches


def shard(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's disjoint share of an epoch's batches; every rank gets the same count
    (the remainder is dropped) so collective calls stay in step."""
    usable = len(batches) - len(batches) % world_size
    return batches[rank:usable:world_size]
