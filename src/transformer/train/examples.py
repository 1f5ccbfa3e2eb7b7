"""A run's data: its source (``data/sources.py``) and how the training split is held
(``data/storage.py``), the tokenizer (trained on rank 0, or the resumed run's), the encoded
training and validation pairs, and each epoch's batches as a pure function of (seed, epoch).
A multilingual run (data.corpora, data.tgt_lang_tag) tags each corpus's sources and draws
each epoch's examples by data.sampling_temperature."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from transformer.config import TrainConfig
from transformer.data.batching import Example, encode_examples, pair_lengths, shard, token_batches
from transformer.data.cache import cache_root
from transformer.data.corpus import reversed_pairs
from transformer.data.multilingual import corpus_prefix, encode_corpus, epoch_indices
from transformer.data.sources import Part, source_for
from transformer.data.storage import Storage, storage, train_examples, train_tokenizer
from transformer.data.streaming import stream_batches
from transformer.data.tokenizer import Tokenizer
from transformer.errors import UserError
from transformer.train.distributed import Dist, barrier, share


def run_tokenizer(
    run_dir: Path, dist: Dist, resume: tuple[Any, dict] | None, build: Callable[[], Tokenizer]
) -> Tokenizer:
    """The run's tokenizer: the resumed one, else the one in ``run_dir``, else ``build`` BPE on
    rank 0 (see ``storage.train_tokenizer``); shared with every rank and saved by rank 0."""
    if resume is not None:
        tok = Tokenizer.from_state(resume[1]["tokenizer"])
    else:
        tok = Tokenizer.load(run_dir)
        if tok is None and dist.main:
            tok = build()
        tok = Tokenizer.from_state(share(tok.to_state() if dist.main else None, dist))
    if dist.main:
        tok.save(run_dir)
    return tok


def reversed_examples(tokenizer: Tokenizer, train: Sequence[Part], max_len: int, name: str) -> list[Example]:
    """Each training pair as target -> source, for the first trainer.bidirectional_epochs
    (BiT, Ding et al. 2021: both directions through one model warm it up on twice the
    data; no language tags, the source's language tells the direction)."""
    if not train or not tokenizer.joint:
        raise UserError(
            "trainer.bidirectional_epochs needs data.joint_vocab=true and an in-memory corpus (not data.streaming)"
        )
    pairs = reversed_pairs(train[0].pairs)
    return encode_examples(*tokenizer.encode_pairs(pairs), max_len, f"{name} train, reversed")


class RunData:
    """The source, how its training split is held, the tokenizer, the examples and each epoch's batches."""

    def __init__(self, cfg: TrainConfig, dist: Dist, resume: tuple[Any, dict] | None):
        self.cfg, self.dist, d, t = cfg, dist, cfg.data, cfg.trainer
        self.source = source_for(d)
        self.source.check_training(t)
        self.storage = storage(self.source, need_pairs=t.bidirectional_epochs > 0)
        self.streaming = self.storage is Storage.STREAM
        cache_dir = cache_root(d, Path(cfg.run_dir))
        train = self.source.train_parts() if self.storage is Storage.MEMORY else []
        build = partial(train_tokenizer, self.source, self.storage, train, cache_dir)
        self.tokenizer = run_tokenizer(Path(cfg.run_dir), dist, resume, build)
        if not dist.main and not train:
            barrier(dist)  # rank 0 builds the cache, the others then map it
        self.train_examples, self.sizes = train_examples(
            self.source, self.storage, self.tokenizer, self.max_len, train, cache_dir
        )
        if dist.main and not train:
            barrier(dist)
        reverse = reversed_examples(self.tokenizer, train, self.max_len, d.name) if t.bidirectional_epochs else []
        self.both_ways_examples = self.train_examples + reverse if reverse else self.train_examples
        self.setup_valid(self.source.parts("valid"))

    def setup_valid(self, parts: Sequence[Part]) -> None:
        """Validation sentences of each part, one after the other (data.valid_max_sentences per
        part); a named language pair lists its sentences in ``valid_groups`` for its own BLEU."""
        cap = self.cfg.data.valid_max_sentences
        self.valid_examples, self.valid_sources, self.valid_refs, self.valid_source_ids = [], [], [], []
        self.valid_groups: dict[str, list[int]] = {}
        for p in parts:
            pairs = p.pairs[:cap] if cap > 0 else p.pairs
            if p.pair:
                start = len(self.valid_sources)
                self.valid_groups.setdefault(p.pair, []).extend(range(start, start + len(pairs)))
            prefix = corpus_prefix(self.tokenizer, p.tag, p.pair)
            examples, source_ids = encode_corpus(self.tokenizer, pairs, prefix, self.max_len, f"{p.cfg.name} valid")
            self.valid_examples += examples
            self.valid_sources += [s for s, _ in pairs]
            self.valid_refs += [r for _, r in pairs]
            self.valid_source_ids += source_ids  # BLEU needs every sentence

    @property
    def max_len(self) -> int:
        return min(self.cfg.data.max_len, self.cfg.model.max_positions)

    def epoch_batches(self, epoch: int, skip: int = 0) -> Iterator[list[Example]]:
        """This rank's batches of ``epoch``, a pure function of the seed and the epoch; the
        first ``skip`` are passed over without building their examples."""
        d, seed, rank, world = self.cfg.data, self.cfg.trainer.seed, self.dist.rank, self.dist.world
        if self.streaming:
            return itertools.islice(
                stream_batches(self.source, self.tokenizer, self.max_len, seed, epoch, rank, world), skip, None
            )
        examples = self.epoch_examples(epoch)
        batches = shard(
            token_batches(pair_lengths(examples), d.max_tokens, seed, epoch, buckets=d.length_buckets), rank, world
        )
        return ([examples[i] for i in b] for b in batches[skip:])

    def epoch_examples(self, epoch: int) -> Sequence[Example]:
        """What ``epoch`` batches: with several corpora the draw of data.sampling_temperature (an
        epoch is as many examples as all corpora hold), else the corpus (BiT epochs: both ways)."""
        if len(self.sizes) > 1:
            indices = epoch_indices(self.sizes, self.cfg.data.sampling_temperature, self.cfg.trainer.seed, epoch)
            return [self.train_examples[i] for i in indices.tolist()]
        return self.both_ways_examples if epoch < self.cfg.trainer.bidirectional_epochs else self.train_examples
