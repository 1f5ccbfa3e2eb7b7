"""Token-budget batches, bucketed by length, and the one place a batch is built.

Batches of an epoch are a pure function of (lengths, budget, seed, epoch), so a resumed
run rebuilds exactly the batches it was going through and skips the ones it has done.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
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
    positions: Tensor  # (M,) where tgt_out.flatten() holds a real token: found on the host, never on the GPU
    target: Tensor  # (M,) tgt_out.flatten()[positions], the tokens the loss counts
    n_tokens: int  # target tokens that count in the loss (M)
    pad_id: int = PAD  # the padding id (an imported model's own)

    def to(self, device: torch.device) -> Batch:
        """On ``device``; to CUDA from pinned memory without blocking, so the host builds the
        next batch while the GPU runs this one."""
        cuda = device.type == "cuda"

        def move(t: Tensor) -> Tensor:
            return t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)

        tensors = (self.src, self.tgt_in, self.tgt_out, self.positions, self.target)
        return Batch(*(move(t) for t in tensors), self.n_tokens, self.pad_id)


def id_lengths(ids: Sequence[Sequence[int]]) -> np.ndarray:
    return np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))


def keep_mask(
    src_lens: np.ndarray, tgt_lens: np.ndarray, max_len: int, max_ratio: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Which encoded pairs training keeps: (kept, too_long); ``too_long`` marks pairs with a
    side longer than ``max_len`` (ids with specials), and with ``max_ratio`` > 0 a pair is
    also dropped when one side has more than ``max_ratio`` times the other's subwords."""
    too_long = (src_lens > max_len) | (tgt_lens > max_len)
    kept = ~too_long
    if max_ratio > 0:
        s, t = np.maximum(src_lens - 1, 1), np.maximum(tgt_lens - 2, 1)  # pieces, without EOS / BOS+EOS
        kept &= np.maximum(s, t) <= max_ratio * np.minimum(s, t)
    return kept, too_long


def log_dropped(name: str, total: int, too_long: int, bad_ratio: int, max_len: int, max_ratio: float) -> None:
    if too_long:
        log.warning("%s: dropped %d of %d pairs longer than data.max_len=%d subwords", name, too_long, total, max_len)
    if bad_ratio:
        log.warning(
            "%s: dropped %d of %d pairs whose length ratio exceeds data.max_len_ratio=%g",
            name,
            bad_ratio,
            total,
            max_ratio,
        )


def encode_examples(
    src_ids: Sequence[list[int]], tgt_ids: Sequence[list[int]], max_len: int, name: str, max_ratio: float = 0.0
) -> list[Example]:
    """Pair up encoded sentences, dropping (and counting) pairs longer than ``max_len`` or,
    with ``max_ratio``, of too unequal lengths."""
    kept, too_long = keep_mask(id_lengths(src_ids), id_lengths(tgt_ids), max_len, max_ratio)
    log_dropped(name, len(src_ids), int(too_long.sum()), int((~kept).sum() - too_long.sum()), max_len, max_ratio)
    return [Example(s, t) for s, t, k in zip(src_ids, tgt_ids, kept) if k]


def pair_lengths(examples: Sequence[Example]) -> np.ndarray:
    """(n, 2) int: source length and target length without BOS (what a batch holds), read
    from the arrays of a memory-mapped corpus (``lengths``) rather than example by example."""
    if hasattr(examples, "lengths"):
        return examples.lengths
    return np.array([(len(e.src), len(e.tgt) - 1) for e in examples], dtype=np.int64).reshape(-1, 2)


def chunked(items: Iterable[Any], size: int) -> Iterator[list]:
    """Consecutive groups of ``size`` items; the last group may be shorter."""
    it = iter(items)
    while group := list(itertools.islice(it, size)):
        yield group


def pad(seqs: Sequence[Sequence[int]], pad_id: int = PAD, length: int = 0) -> Tensor:
    """Right-pad to the longest sequence, or to ``length`` if longer: (B, L) int64."""
    out = torch.full((len(seqs), max(length, *(len(s) for s in seqs))), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def bucket_lengths(lengths: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
    """Each of ``lengths`` rounded up to the smallest of ``buckets`` (increasing) holding it;
    past the largest, to the next multiple of it."""
    edges = np.asarray(buckets, dtype=np.int64)
    beyond = -(-lengths // edges[-1]) * edges[-1]
    return np.where(lengths <= edges[-1], edges[np.minimum(np.searchsorted(edges, lengths), len(edges) - 1)], beyond)


def collate(examples: Sequence[Example], pad_id: int = PAD, buckets: Sequence[int] = ()) -> Batch:
    """The batch of ``examples``. With ``buckets`` (data.length_buckets) source and target are
    both padded to the bucket of the longer side, so a compiled model meets a few shapes."""
    longest = max(max(len(e.src), len(e.tgt) - 1) for e in examples)
    length = int(bucket_lengths(np.array([longest]), buckets)[0]) if buckets else 0
    src = pad([e.src for e in examples], pad_id, length)
    tgt = pad([e.tgt for e in examples], pad_id, length + 1 if length else 0)
    tgt_out = tgt[:, 1:]
    positions = (tgt_out.flatten() != pad_id).nonzero().squeeze(1)
    return Batch(
        src=src,
        tgt_in=tgt[:, :-1],
        tgt_out=tgt_out,
        n_tokens=sum(len(e.tgt) - 1 for e in examples),
        pad_id=pad_id,
        positions=positions,
        target=tgt_out.flatten()[positions],
    )


def token_batches(
    lengths: Sequence[tuple[int, int]] | np.ndarray,
    max_tokens: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    buckets: Sequence[int] = (),
) -> list[list[int]]:
    """Indices grouped so that each batch's padded size (rows x longest side) stays within
    ``max_tokens``. Examples are sorted by length (random tie-break per epoch) so batches
    hold similar lengths; batch order is shuffled per epoch. Every index appears once.
    ``lengths`` may be an (n, 2) array: sorting is numpy's, and the result is the same as
    for the list of tuples (the tie-break shuffle is ``random``'s, as it always was). Plain
    ints (n,) are source lengths alone: decoding's batches, with ``shuffle=False``. With
    ``buckets`` (data.length_buckets) a batch's size counts its rows at their bucket's length,
    as ``collate`` pads them."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim == 1:
        lengths = np.stack([lengths, np.zeros_like(lengths)], axis=1)
    lengths = lengths.reshape(-1, 2)
    if not len(lengths):
        return []
    rng = random.Random(seed * 100003 + epoch)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    order = np.array(order, dtype=np.int64)
    key = lengths[order, 0] * (int(lengths[:, 1].max()) + 1) + lengths[order, 1]  # (source, target) in one int
    order = order[np.argsort(key, kind="stable")]  # stable: the shuffle breaks ties
    starts, count, longest = [0], 0, 0  # batch k is order[starts[k]:starts[k + 1]]
    sizes = bucket_lengths(lengths.max(axis=1), buckets) if buckets else lengths.max(axis=1)
    for k, size in enumerate(sizes[order].tolist()):  # greedy, as plain as Python gets
        if size > longest:
            longest = size
        count += 1
        if count > 1 and longest * count > max_tokens:
            starts.append(k)
            count, longest = 1, size
    starts.append(len(order))
    order = order.tolist()
    batches = [order[a:b] for a, b in zip(starts, starts[1:])]
    if shuffle:
        rng.shuffle(batches)
    return batches


def shard(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's disjoint share of an epoch's batches; every rank gets the same count
    (the remainder is dropped) so collective calls stay in step."""
    usable = len(batches) - len(batches) % world_size
    return batches[rank:usable:world_size]


def balanced_shard(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """Like ``shard``, but every index lands on exactly one rank: the largest batches are
    halved (staying within budget) until their count divides evenly. Only when every batch
    holds a single example and they still do not divide evenly is the remainder dropped."""
    batches = list(batches)
    while len(batches) % world_size:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        b = batches[largest]
        if len(b) < 2:
            break
        batches[largest : largest + 1] = [b[: len(b) // 2], b[len(b) // 2 :]]
    return shard(batches, rank, world_size)
