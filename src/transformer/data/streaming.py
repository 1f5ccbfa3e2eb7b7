"""Training batches streamed from a corpus too big to hold in memory (``data.streaming=true``),
from any source that can stream (``Source.stream``: a Hugging Face dataset, local files).

The training split is read record by record through a shuffle buffer of
``data.shuffle_buffer`` pairs (the library's for hub datasets, the same reservoir scheme,
``sources.shuffle_buffered``, for files); every ``data.shuffle_buffer`` pairs are tokenized,
sorted by length and cut into token-budget batches exactly as an in-memory epoch is
(``token_batches``), so memory is bounded by the buffer, not the corpus. A hub stream trains the tokenizer on its first
``data.tokenizer_sample`` pairs; files on a reproducible random sample (``data/storage.py``).

Every rank reads the stream and takes a disjoint share of each buffer's batches, all ranks
the same number (``balanced_shard`` halves batches rather than drop any), so each pair is
trained on exactly once per epoch across the ranks. Resuming replays the stream up to the
saved batch position (tokenizing, not training): exact when the dataset yields records in a
fixed order, as local files do, at the cost of re-reading that part of the epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

from transformer.config import DataConfig
from transformer.data.batching import Example, balanced_shard, chunked, encode_examples, pair_lengths, token_batches
from transformer.data.corpus import Pair
from transformer.data.sources import Source
from transformer.data.tokenizer import Tokenizer
from transformer.errors import UserError


def stream_batches(
    source: Source, tokenizer: Tokenizer, max_len: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> Iterator[list[Example]]:
    """This rank's batches for one pass over the source's stream, a pure function of (seed, epoch)."""
    cfg = source.cfg
    if cfg.shuffle_buffer < 1:
        raise UserError(f"data.shuffle_buffer={cfg.shuffle_buffer}: expected a positive number of pairs")
    buffers = chunked(source.stream(shuffle_seed=seed * 1009 + epoch), cfg.shuffle_buffer)
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
