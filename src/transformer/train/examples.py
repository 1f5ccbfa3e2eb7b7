"""A run's data: the tokenizer (trained on rank 0, or the resumed run's), the encoded
training and validation pairs, and each epoch's batches as a pure function of (seed, epoch)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformer.data.batching import Example, encode_examples, pair_lengths, shard, token_batches
from transformer.data.cache import cache_root
from transformer.data.corpus import Pair, load_split
from transformer.data.source import read_train_pairs, train_examples, train_tokenizer
from transformer.data.tokenizer import Tokenizer
from transformer.errors import UserError
from transformer.train.distributed import Dist, barrier, share


class RunData:
    def __init__(self, cfg: Any, dist: Dist, resume: tuple[Any, dict] | None):
        self.cfg, self.dist = cfg, dist
        d = cfg.data
        self.streaming = bool(d.streaming)
        self.cache_dir = cache_root(d, Path(cfg.run_dir))
        train_pairs = read_train_pairs(d, need_pairs=cfg.trainer.bidirectional_epochs > 0)
        self.tokenizer = self.setup_tokenizer(train_pairs, resume)
        if not dist.main and train_pairs is None:
            barrier(dist)  # rank 0 builds the cache, the others then map it
        self.train_examples = train_examples(d, self.tokenizer, self.max_len, train_pairs, self.cache_dir)
        if dist.main and train_pairs is None:
            barrier(dist)
        self.both_ways_examples = (
            self.train_examples + reverse if (reverse := self.reversed_examples(train_pairs)) else self.train_examples
        )
        valid_pairs = load_split(d, "valid")
        if d.valid_max_sentences > 0:
            valid_pairs = valid_pairs[: d.valid_max_sentences]
        self.valid_examples = self.encode(valid_pairs, "valid")
        self.valid_sources = [s for s, _ in valid_pairs]
        self.valid_refs = [r for _, r in valid_pairs]
        self.valid_source_ids = self.tokenizer.encode_src(self.valid_sources)  # BLEU needs every sentence

    def setup_tokenizer(self, train_pairs: list[Pair] | None, resume: tuple[Any, dict] | None) -> Tokenizer:
        """Reuse the run's tokenizer (resume), else train BPE on rank 0 (see
        ``train_tokenizer``) and share it."""
        run_dir = Path(self.cfg.run_dir)
        if resume is not None:
            tok = Tokenizer.from_state(resume[1]["tokenizer"])
        else:
            tok = Tokenizer.load(run_dir)
            if tok is None and self.dist.main:
                tok = train_tokenizer(self.cfg.data, train_pairs, self.cache_dir)
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
        return self.encode([(t, s) for s, t in train_pairs], "train, reversed")

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
        examples = self.both_ways_examples if epoch < self.cfg.trainer.bidirectional_epochs else self.train_examples
        batches = shard(
            token_batches(pair_lengths(examples), d.max_tokens, seed, epoch), self.dist.rank, self.dist.world
        )
        return ([examples[i] for i in b] for b in batches[skip:])
