"""Training batches streamed from a Hugging Face dataset too big to hold in memory
(``data.source=hub data.streaming=true``).

The training split is read record by record (``datasets`` with ``streaming=True``), through
the library's shuffle buffer; every ``data.shuffle_buffer`` pairs are tokenized, sorted by
length and cut into token-budget batches exactly as an in-memory epoch is (``token_batches``),
so memory is bounded by the buffer, not the corpus. The tokenizer is trained on the first
``data.tokenizer_sample`` pairs of the stream.

Every rank reads the whole stream and keeps its share of each buffer's batches, so all ranks
see the same number of batches. Resuming replays the stream up to the saved batch position
(tokenizing, not training): exact when the dataset yields records in a fixed order, as local
files do, at the cost of re-reading that part of the epoch.
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional

from transformer.config import DataConfig
from transformer.data.batching import Example, encode_examples, shard, token_batches
from transformer.data.corpus import Pair, load_hub, pair_from_record
from transformer.data.tokenizer import Tokenizer
from transformer.errors import UserError

log = logging.getLogger(__name__)


def stream_pairs(cfg: DataConfig, shuffle_seed: Optional[int] = None) -> Iterator[Pair]:
    """(source, target) pairs of the training split in stream order (shuffled through a
    ``data.shuffle_buffer`` buffer when ``shuffle_seed`` is given); blank pairs are skipped."""
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
    buffer: list[Pair] = []
    n_buffers = 0
    for pair in stream_pairs(cfg, shuffle_seed=seed * 1009 + epoch):
        buffer.append(pair)
        if len(buffer) == cfg.shuffle_buffer:
            yield from buffer_batches(buffer, cfg, tokenizer, max_len, seed * 1009 + n_buffers, epoch, rank, world)
            buffer, n_buffers = [], n_buffers + 1
    if buffer:
        yield from buffer_batches(buffer, cfg, tokenizer, max_len, seed * 1009 + n_buffers, epoch, rank, world)


def buffer_batches(
    pairs: list[Pair], cfg: DataConfig, tokenizer: Tokenizer, max_len: int, seed: int, epoch: int, rank: int, world: int
) -> Iterator[list[Example]]:
    """Length-sorted token-budget batches of one buffer, in shuffled order; this rank's share."""
    examples = encode_examples(*tokenizer.encode_pairs(pairs), max_len, f"{cfg.name} train (stream buffer)")
    lengths = [(len(e.src), len(e.tgt) - 1) for e in examples]
    for batch in shard(token_batches(lengths, cfg.max_tokens, seed, epoch), rank, world):
        yield [examples[i] for i in batch]
