"""Where the training examples come from: a list in memory, the memory-mapped cache, or a
stream; the trainer asks here and treats the answer as a sequence of examples.

- ``data.streaming=true`` (hub or files): nothing is held; ``streaming.stream_batches``
  reads each epoch.
- ``data.source=files`` with ``data.cache=true`` (the default): ``cache.CachedCorpus``.
- otherwise (builtin, hub, ``data.cache=false``, BiT epochs, synthetic pairs mixed in by
  ``synthetic.with_synthetic``): encoded pairs in a list.

Every way gives the same pairs in the same order, filtered the same way, so a cached run
batches and trains exactly as an uncached one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from transformer.config import DataConfig
from transformer.data.batching import Example, encode_examples
from transformer.data.cache import cached_tokenizer, open_corpus, uses_cache
from transformer.data.corpus import Pair, iter_train_pairs, load_train_pairs
from transformer.data.synthetic import user_symbols, uses_synthetic, with_synthetic
from transformer.data.tokenizer import Tokenizer, build_tokenizer
from transformer.errors import UserError


def read_train_pairs(cfg: DataConfig, need_pairs: bool = False) -> list[Pair] | None:
    """The training pairs in memory, or None when they are streamed or memory-mapped
    (``need_pairs``: a feature needs the text, so the cache is skipped)."""
    if uses_synthetic(cfg):
        return with_synthetic(cfg, load_train_pairs(cfg))
    if cfg.streaming:
        if cfg.source not in ("hub", "files"):
            raise UserError(
                f"data.streaming=true needs data.source=hub or files (got {cfg.source!r}); other sources are read into memory"
            )
        return None
    if uses_cache(cfg) and not need_pairs:
        return None
    return load_train_pairs(cfg)


def train_tokenizer(cfg: DataConfig, pairs: list[Pair] | None, cache_dir: Path) -> Tokenizer:
    """BPE for a new run, trained on (a sample of) the training pairs; local files reuse the
    model cached for the same corpus and settings. A streamed hub corpus trains on its first
    ``data.tokenizer_sample`` pairs."""
    if pairs is None and cfg.source == "files":
        if cfg.cache:
            return cached_tokenizer(cfg, cache_dir)
        pairs = iter_train_pairs(cfg)  # type: ignore[assignment]
    elif pairs is None:
        from transformer.data.streaming import stream_pairs

        pairs = list(itertools.islice(stream_pairs(cfg), cfg.tokenizer_sample))
    return build_tokenizer(pairs, cfg.vocab_size, cfg.joint_vocab, cfg.tokenizer_sample, symbols=user_symbols(cfg))


def train_examples(
    cfg: DataConfig, tokenizer: Tokenizer, max_len: int, pairs: list[Pair] | None, cache_dir: Path
) -> Sequence[Example]:
    """The training examples, filtered by data.max_len and data.max_len_ratio (empty when streamed)."""
    if pairs is not None:
        return encode_examples(*tokenizer.encode_pairs(pairs), max_len, f"{cfg.name} train", cfg.max_len_ratio)
    if cfg.streaming:
        return []
    return open_corpus(cfg, tokenizer, max_len, cache_dir)
