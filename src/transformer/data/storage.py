"""How a run holds its training split, a choice made apart from where the pairs come from
(``data/sources.py``): ``storage`` decides it once from data.streaming, data.cache and what
the source can do.

- ``STREAM`` (``data.streaming=true``, a source that can stream: files, hub): nothing is held;
  ``streaming.stream_batches`` reads each epoch.
- ``CACHE`` (``data.cache=true``, the default, a source that can be cached: files):
  ``cache.CachedCorpus`` maps the ids encoded once.
- ``MEMORY`` otherwise (builtin, hub, ``data.cache=false``, BiT epochs, synthetic pairs mixed
  in by ``synthetic.with_synthetic``, data.corpora): encoded pairs in a list.

Every way gives the same pairs in the same order, filtered the same way, so a cached run
batches and trains exactly as an uncached one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from enum import Enum
from pathlib import Path

from transformer.data.batching import Example
from transformer.data.cache import cached_tokenizer, open_corpus
from transformer.data.multilingual import corpus_prefix, encode_corpus
from transformer.data.sources import SOURCES, Part, Source
from transformer.data.synthetic import user_symbols, uses_synthetic
from transformer.data.tokenizer import Tokenizer, build_tokenizer
from transformer.errors import UserError


class Storage(Enum):
    MEMORY = "memory"  # encoded pairs in a list
    CACHE = "cache"  # memory-mapped token ids (data.cache)
    STREAM = "stream"  # read again each epoch (data.streaming)


def storage(source: Source, need_pairs: bool = False) -> Storage:
    """Where the training split lives (``need_pairs``: a feature needs the text in memory, so
    the cache is skipped)."""
    cfg = source.cfg
    if uses_synthetic(cfg):
        return Storage.MEMORY  # mixed with the corpus in memory (with_synthetic refuses data.streaming)
    if cfg.streaming:
        if not source.can_stream:
            streamable = " or ".join(name for name, cls in SOURCES.items() if cls.can_stream)
            raise UserError(
                f"data.streaming=true needs data.source={streamable} (got {source.name!r}); other sources are read into memory"
            )
        return Storage.STREAM
    if cfg.cache and source.can_cache and not need_pairs:
        return Storage.CACHE
    return Storage.MEMORY


def train_tokenizer(source: Source, kept: Storage, parts: Sequence[Part], cache_dir: Path) -> Tokenizer:
    """BPE for a new run, trained on (a sample of) the training pairs held in memory (with a
    tag piece per tagged target language); a source that can be cached reuses the model
    cached for the same corpus and settings, a streamed one trains on ``tokenizer_pairs``."""
    cfg = source.cfg
    if kept is not Storage.MEMORY and cfg.cache and source.can_cache:
        return cached_tokenizer(source, cache_dir)
    pairs = (
        itertools.chain.from_iterable(p.pairs for p in parts) if kept is Storage.MEMORY else source.tokenizer_pairs()
    )
    languages = sorted({p.tag for p in parts if p.tag})
    return build_tokenizer(pairs, cfg.vocab_size, cfg.joint_vocab, cfg.tokenizer_sample, languages, user_symbols(cfg))


def train_examples(
    source: Source, kept: Storage, tokenizer: Tokenizer, max_len: int, parts: Sequence[Part], cache_dir: Path
) -> tuple[Sequence[Example], list[int]]:
    """The training examples, filtered by data.max_len and data.max_len_ratio (none when
    streamed), and how many each part of the memory holds."""
    if kept is Storage.STREAM:
        return [], []
    if kept is Storage.CACHE:
        return open_corpus(source, tokenizer, max_len, cache_dir), []
    examples: list[Example] = []
    sizes = []
    for p in parts:
        name = " ".join(filter(None, (p.cfg.name, p.pair, "train")))
        encoded, _ = encode_corpus(
            tokenizer, p.pairs, corpus_prefix(tokenizer, p.tag, p.pair), max_len, name, p.cfg.max_len_ratio
        )
        examples += encoded
        sizes.append(len(encoded))
    return examples, sizes
