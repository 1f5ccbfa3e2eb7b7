"""A run's data: the tokenizer (trained on rank 0, or the resumed run's), the encoded
training and validation pairs, and each epoch's batches as a pure function of (seed, epoch).
A multilingual run (data.corpora, data.tgt_lang_tag; data/multilingual.py) reads every corpus
into memory, tags its sources and draws each epoch's examples by data.sampling_temperature."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from transformer.data.batching import Example, encode_examples, pair_lengths, shard, token_batches
from transformer.data.cache import cache_root
from transformer.data.corpus import Pair, load_split, reversed_pairs
from transformer.data.multilingual import (
    Corpus,
    corpora,
    corpus_pairs,
    encode_corpus,
    epoch_indices,
    target_languages,
)
from transformer.data.source import read_train_pairs, train_examples, train_tokenizer
from transformer.data.synthetic import refuse_synthetic_with
from transformer.data.tokenizer import Tokenizer, build_tokenizer
from transformer.errors import UserError
from transformer.train.distributed import Dist, barrier, share


class RunData:
    def __init__(self, cfg: Any, dist: Dist, resume: tuple[Any, dict] | None):
        self.cfg, self.dist = cfg, dist
        d = cfg.data
        self.streaming = bool(d.streaming)
        self.cache_dir = cache_root(d, Path(cfg.run_dir))
        self.corpora = corpora(d)  # empty: one corpus, read as it always was
        self.sizes: list[int] = []  # training examples of each corpus (data.corpora), for sampling
        self.valid_groups: dict[str, list[int]] = {}  # language pair -> its validation sentences
        if self.corpora:
            self.setup_corpora(resume)
            return
        train_pairs = read_train_pairs(d, need_pairs=cfg.trainer.bidirectional_epochs > 0)
        self.tokenizer = self.setup_tokenizer(resume, lambda: train_tokenizer(d, train_pairs, self.cache_dir))
        if not dist.main and train_pairs is None:
            barrier(dist)  # rank 0 builds the cache, the others then map it
        self.train_examples = train_examples(d, self.tokenizer, self.max_len, train_pairs, self.cache_dir)
        if dist.main and train_pairs is None:
            barrier(dist)
        self.both_ways_examples = (
            self.train_examples + reverse if (reverse := self.reversed_examples(train_pairs)) else self.train_examples
        )
        self.setup_valid([(d.name, "", [], load_split(d, "valid"))])

    def setup_corpora(self, resume: tuple[Any, dict] | None) -> None:
        """Every corpus in memory, its sources tagged; one BPE model over all of them."""
        d = self.cfg.data
        refuse_synthetic_with(d, "data.corpora")
        if self.cfg.trainer.bidirectional_epochs:
            raise UserError(
                "trainer.bidirectional_epochs does not tag the reversed pairs: with data.corpora add each "
                "corpus reversed as an entry with reverse: true"
            )
        train = [corpus_pairs(c, "train") for c in self.corpora]
        languages = target_languages(d, self.corpora)
        everything = [pair for pairs in train for pair in pairs]
        build = partial(build_tokenizer, everything, d.vocab_size, d.joint_vocab, d.tokenizer_sample, languages)
        self.tokenizer = self.setup_tokenizer(resume, build)
        self.train_examples = []
        for c, pairs in zip(self.corpora, train):
            examples, _ = encode_corpus(
                self.tokenizer, pairs, self.prefix(c), self.max_len, f"{c.cfg.name} {c.pair} train", c.cfg.max_len_ratio
            )
            self.sizes.append(len(examples))
            self.train_examples += examples
        self.both_ways_examples = self.train_examples
        self.setup_valid([(c.cfg.name, c.pair, self.prefix(c), corpus_pairs(c, "valid")) for c in self.corpora])

    def prefix(self, corpus: Corpus) -> list[int]:
        """The tag ids opening the corpus's sources ([] without data.tgt_lang_tag)."""
        if not self.cfg.data.tgt_lang_tag:
            return []
        if corpus.tgt not in self.tokenizer.tags:
            raise UserError(
                f"data.tgt_lang_tag: the run's tokenizer has no tag <2{corpus.tgt}> for {corpus.pair} (it has "
                f"{', '.join(self.tokenizer.languages) or 'none'}; trainer.init_from and resume bring their own)"
            )
        return [self.tokenizer.tags[corpus.tgt]]

    def setup_valid(self, parts: Sequence[tuple[str, str, list[int], list[Pair]]]) -> None:
        """Validation sentences of each (corpus name, pair, tag ids, pairs) part, one part after
        the other (data.valid_max_sentences per part); a named pair lists its sentences in
        ``valid_groups`` for its own BLEU."""
        cap = self.cfg.data.valid_max_sentences
        self.valid_examples, self.valid_sources, self.valid_refs, self.valid_source_ids = [], [], [], []
        for name, pair, prefix, pairs in parts:
            pairs = pairs[:cap] if cap > 0 else pairs
            if pair:
                self.valid_groups.setdefault(pair, []).extend(
                    range(len(self.valid_sources), len(self.valid_sources) + len(pairs))
                )
            examples, source_ids = encode_corpus(self.tokenizer, pairs, prefix, self.max_len, f"{name} valid")
            self.valid_examples += examples
            self.valid_sources += [s for s, _ in pairs]
            self.valid_refs += [r for _, r in pairs]
            self.valid_source_ids += source_ids  # BLEU needs every sentence

    def setup_tokenizer(self, resume: tuple[Any, dict] | None, build: Callable[[], Tokenizer]) -> Tokenizer:
        """Reuse the run's tokenizer (resume), else ``build`` BPE on rank 0 (see
        ``train_tokenizer``) and share it."""
        run_dir = Path(self.cfg.run_dir)
        if resume is not None:
            tok = Tokenizer.from_state(resume[1]["tokenizer"])
        else:
            tok = Tokenizer.load(run_dir)
            if tok is None and self.dist.main:
                tok = build()
            tok = Tokenizer.from_state(share(tok.to_state() if self.dist.main else None, self.dist))
        if self.dist.main:
            tok.save(run_dir)
        return tok

    def reversed_examples(self, train_pairs: list[Pair] | None) -> list[Example]:
        """Each training pair as target -> source, for the first trainer.bidirectional_epochs
        (BiT, Ding et al. 2021: both directions through one model warm it up on twice the
        data; no language tags, the source's language tells the direction)."""
        if not self.cfg.trainer.bidirectional_epochs:
            return []
        if train_pairs is None or not self.tokenizer.joint:
            raise UserError(
                "trainer.bidirectional_epochs needs data.joint_vocab=true and an in-memory corpus (not data.streaming)"
            )
        return self.encode(reversed_pairs(train_pairs), "train, reversed")

    def encode(self, pairs: list[Pair], name: str) -> list[Example]:
        return encode_examples(*self.tokenizer.encode_pairs(pairs), self.max_len, f"{self.cfg.data.name} {name}")

    @property
    def max_len(self) -> int:
        return min(self.cfg.data.max_len, self.cfg.model.max_positions)

    def epoch_batches(self, epoch: int, skip: int = 0) -> Iterator[list[Example]]:
        """This rank's batches of ``epoch``, a pure function of the seed and the epoch; the
        first ``skip`` are passed over without building their examples."""
        d, seed = self.cfg.data, self.cfg.trainer.seed
        if self.streaming:
            from transformer.data.streaming import stream_batches

            return itertools.islice(
                stream_batches(d, self.tokenizer, self.max_len, seed, epoch, self.dist.rank, self.dist.world),
                skip,
                None,
            )
        examples = self.epoch_examples(epoch)
        batches = shard(
            token_batches(pair_lengths(examples), d.max_tokens, seed, epoch, buckets=d.length_buckets),
            self.dist.rank,
            self.dist.world,
        )
        return ([examples[i] for i in b] for b in batches[skip:])

    def epoch_examples(self, epoch: int) -> Sequence[Example]:
        """What ``epoch`` batches: with several corpora the draw of data.sampling_temperature (an
        epoch is as many examples as all corpora hold), else the corpus (BiT epochs: both ways)."""
        if len(self.sizes) > 1:
            t = self.cfg.trainer
            indices = epoch_indices(self.sizes, self.cfg.data.sampling_temperature, t.seed, epoch)
            return [self.train_examples[i] for i in indices.tolist()]
        return self.both_ways_examples if epoch < self.cfg.trainer.bidirectional_epochs else self.train_examples
