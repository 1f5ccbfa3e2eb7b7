"""Training batches streamed from a corpus too big to hold in memory (``data.streaming=true``):
a Hugging Face dataset (``data.source=hub``) or local files (``data.source=files``: text
pairs, TSV or JSON lines, gzipped or not).

The training split is read record by record through a shuffle buffer of
``data.shuffle_buffer`` pairs (the library's for hub datasets, the same reservoir scheme here
for files); every ``data.shuffle_buffer`` pairs are tokenized, sorted by length and cut into
token-budget batches exactly as an in-memory epoch is (``token_batches``), so memory is bounded
by the buffer, not the corpus. A hub stream trains the tokenizer on its first
``data.tokenizer_sample`` pairs; files on a reproducible random sample (``data/source.py``).

Every rank reads the stream and takes a disjoint share of each buffer's batches, all ranks
the same number (``balanced_shard`` halves batches rather than drop any), so each pair is
trained on exactly once per epoch across the ranks. Resuming replays the stream up to the
saved batch position (tokenizing, not training): exact when the dataset yields records in a
fixed order, as local files do, at the cost of re-reading that part of the epoch.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator

from transformer.config import DataConfig
from transformer.data.batching import Example, balanced_shard, chunked, encode_examples, pair_lengths, token_batches
from transformer.data.corpus import Pair, iter_train_pairs, load_hub, pair_from_record
from transformer.data.tokenizer import Tokenizer
from transformer.errors import UserError

log = logging.getLogger(__name__)


def shuffle_buffered(pairs: Iterable[Pair], size: int, seed: int) -> Iterator[Pair]:
    """``pairs`` shuffled through a buffer of ``size``: each new pair takes a random slot and
    sends out the pair that was there (as ``datasets``' ``IterableDataset.shuffle`` does)."""
    rng = random.Random(seed)
    buffer: list[Pair] = []
    for pair in pairs:
        if len(buffer) < size:
            buffer.append(pair)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = pair
    rng.shuffle(buffer)
    yield from buffer


def stream_pairs(cfg: DataConfig, shuffle_seed: int | None = None) -> Iterator[Pair]:
    """(source, target) pairs of the training split in stream order (shuffled through a
    ``data.shuffle_buffer`` buffer when ``shuffle_seed`` is given); blank pairs are skipped."""
    if cfg.source == "files":
        pairs = iter_train_pairs(cfg)
        yield from pairs if shuffle_seed is None else shuffle_buffered(pairs, cfg.shuffle_buffer, shuffle_seed)
        return
    ds = load_hub(cfg, cfg.train_split, streaming=True)
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed, buffer_size=cfg.shuffle_buffer)
    where = f"{cfg.hub_name}[{cfg.train_split}]"
    for i, record in enumerate(ds):
        src, tgt = (side.strip() for side in pair_from_record(record, cfg, f"{where} row {i}"))
        if src and tgt:
            yield src, tgt


def stream_batches(
    cfg: DataConfig, tokenizer: Tokenizer, max_len: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> Iterator[list[Example]]:
    """This rank's batches for one pass over the stream, a pure function of (seed, epoch)."""
    if cfg.shuffle_buffer < 1:
        raise UserError(f"data.shuffle_buffer={cfg.shuffle_buffer}: expected a positive number of pairs")
    buffers = chunked(stream_pairs(cfg, shuffle_seed=seed * 1009 + epoch), cfg.shuffle_buffer)
    held = next(buffers, [])
    n_buffers = 0
    for buffer in buffers:
        if len(buffer) < world:  # a last buffer too short to share: batched with the one before
            held += buffer
            break
        yield from buffer_batches(held, cfg, tokenizer, max_len, seed * 1009 + n_buffers, epoch, rank, world)
        held, n_buffers = buffer, n_buffers + 1
    if held:
        yield from buffer_batches(held, cfg, tokenizer, max_len, seed * 1009 + n_buffers, epoch, rank, world)


def buffer_batches(
    pairs: list[Pair], cfg: DataConfig, tokenizer: Tokenizer, max_len: int, seed: int, epoch: int, rank: int, world: int
) -> Iterator[list[Example]]:
    """Length-sorted token-budget batches of one buffer, in shuffled order; this rank's share."""
    examples = encode_examples(
        *tokenizer.encode_pairs(pairs), max_len, f"{cfg.name} train (stream buffer)", cfg.max_len_ratio
    )
    for batch in balanced_shard(
        token_batches(pair_lengths(examples), cfg.max_tokens, seed, epoch, buckets=cfg.length_buckets), rank, world
    ):
        yield [examples[i] for i in batch]
