"""Where a corpus's sentence pairs come from: one ``Source`` class per place, registered by its
``data.source`` name, and the factory that picks one (``corpus_source`` is the one place that
reads ``data.source``).

- ``builtin``: English number phrases -> German, generated offline (``data/builtin.py``);
- ``files``: local files, ``data.format`` text pairs (optionally .gz), TSV or JSON lines;
- ``hub``: a Hugging Face ``datasets`` dataset by name (or a local dataset directory);
- ``Mixture``: the corpora of a multilingual run (``data.corpora``, ``data.tgt_lang_tag``),
  each read by its own source above (``source_for`` returns it).

A source only reads raw pairs, naming the file and line (or dataset row) of a bad one;
cleaning, dedup and synthetic pairs are the same for every source. How the training split is
held (in memory, memory-mapped, streamed) is chosen apart (``data/storage.py``), from what a
source says it can do (``can_stream``, ``can_cache``). A new source is a subclass under
``@register``, a preset ``configs/data/NAME.yaml`` and a test (docs/extending.md).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from transformer.config import DataConfig, DataFormat, TrainerConfig
from transformer.data.corpus import (
    Pair,
    clean_pairs,
    duplicate_mask,
    file_identity,
    iter_clean,
    log_duplicates,
    pair_from_record,
    read_jsonl,
    read_text_pair,
    read_tsv,
    reversed_pairs,
)
from transformer.data.multilingual import Corpus, corpora
from transformer.data.synthetic import refuse_synthetic_with, uses_synthetic, with_synthetic
from transformer.errors import UserError, first_line

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Part:
    """One corpus's clean pairs of a split as a run reads them."""

    cfg: DataConfig  # the corpus's data config
    pair: str  # its language pair as trained, e.g. en-de ("" for a one-corpus run without tags)
    tag: str | None  # the language its sources are tagged with (data.tgt_lang_tag), else None
    pairs: list[Pair]


class Source:
    """One corpus's pairs, split by split. A subclass sets ``name`` and implements ``read``; it
    may also implement ``stream`` (and set ``can_stream``) or ``identity`` (``can_cache``)."""

    name: ClassVar[str] = ""  # the data.source value that picks it
    can_stream: ClassVar[bool] = False  # ``stream`` reads the training split record by record (data.streaming)
    can_cache: ClassVar[bool] = False  # ``identity`` keys a memory-mapped training split (data.cache)
    split_keys: ClassVar[tuple[str, ...]] = ("name",)  # data keys deciding its test sentences (run card)

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def read(self, split: str) -> Iterable[Pair]:
        """Raw pairs of ``split`` as stored, in order; an error names the file and line (or row)."""
        raise NotImplementedError

    def stream(self, shuffle_seed: int | None = None) -> Iterator[Pair]:
        """Clean training pairs in stream order, shuffled through a ``data.shuffle_buffer``
        buffer when ``shuffle_seed`` is given."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What tells the training split and its reading apart without reading it (a cache key)."""
        raise NotImplementedError

    def origin(self) -> str:
        """Where the pairs come from, in a word (the run card's list of corpora)."""
        return self.name

    def card_lines(self) -> list[str]:
        """The run card's lines on what each split holds."""
        return []

    def check_training(self, trainer: TrainerConfig) -> None:
        """One error line, before anything is read, for a trainer setting this source cannot feed."""

    def load(self, split: str) -> list[Pair]:
        """Clean pairs of ``split`` (train, valid or test)."""
        if split not in SPLITS:
            raise UserError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
        return clean_pairs(list(self.read(split)), f"{self.cfg.name} {split}")

    def train_pairs(self) -> list[Pair]:
        """Clean training pairs in memory, without repeats when data.dedup is set."""
        pairs = self.load("train")
        if not self.cfg.dedup:
            return pairs
        keep = duplicate_mask(pairs)
        log_duplicates(keep, f"{self.cfg.name} train")
        return list(itertools.compress(pairs, keep))

    def iter_train(self) -> Iterator[Pair]:
        """``train_pairs`` one at a time, the split read again rather than held (a first pass
        finds the repeats for data.dedup)."""
        name = f"{self.cfg.name} train"
        if not self.cfg.dedup:
            return iter_clean(self.read("train"), name)
        keep = duplicate_mask(iter_clean(self.read("train"), name))
        log_duplicates(keep, name)
        return itertools.compress(iter_clean(self.read("train"), name), keep)

    def tokenizer_pairs(self) -> Iterable[Pair]:
        """What BPE trains on when the training split is not in memory (sampled by build_tokenizer)."""
        return self.iter_train()

    def parts(self, split: str) -> list[Part]:
        """The pairs of ``split`` that validation and test scoring read."""
        return [Part(self.cfg, "", None, self.load(split))]

    def train_parts(self) -> list[Part]:
        """The training pairs held in memory, synthetic ones mixed in (data.distilled_file, data.bt_file)."""
        pairs = self.train_pairs()
        return [Part(self.cfg, "", None, with_synthetic(self.cfg, pairs) if uses_synthetic(self.cfg) else pairs)]


SOURCES: dict[str, type[Source]] = {}  # data.source name -> its class, in registration order
S = TypeVar("S", bound=type[Source])


def register(cls: S) -> S:
    """Class decorator: ``data.source=<cls.name>`` reads through ``cls``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a registered source needs a name")
    SOURCES[cls.name] = cls
    return cls


def corpus_source(cfg: DataConfig) -> Source:
    """The source ``data.source`` names; an unknown name is one error line listing the registered ones."""
    cls = SOURCES.get(cfg.source)
    if cls is None:
        raise UserError(f"data.source={cfg.source!r}: expected one of {', '.join(SOURCES)}")
    return cls(cfg)


def source_for(cfg: DataConfig) -> Source:
    """The run's source: the mixture of data.corpora (or one corpus with tagged sources,
    data.tgt_lang_tag), else the one corpus ``data.source`` names."""
    runs = corpora(cfg)
    return Mixture(cfg, runs) if runs else corpus_source(cfg)


def load_split(cfg: DataConfig, split: str) -> list[Pair]:
    """Clean pairs of ``split`` of the corpus ``cfg`` describes (its data.corpora aside)."""
    return corpus_source(cfg).load(split)


def load_train_pairs(cfg: DataConfig) -> list[Pair]:
    """Clean training pairs of the corpus ``cfg`` describes, without repeats when data.dedup is set."""
    return corpus_source(cfg).train_pairs()


def split_parts(cfg: DataConfig, split: str) -> list[tuple[str, str | None, list[Pair]]]:
    """(pair, tag language, pairs) of ``split`` for each corpus of the run (the language None
    when sources are not tagged); a plain one-corpus config is one part named ""."""
    return [(p.pair, p.tag, p.pairs) for p in source_for(cfg).parts(split)]


@register
class Builtin(Source):
    """English number phrases -> German, generated offline (data.builtin_*)."""

    name = "builtin"
    split_keys = ("name", "builtin_train", "builtin_valid", "builtin_test", "builtin_seed")

    def read(self, split: str) -> list[Pair]:
        from transformer.data.builtin import builtin_splits  # the generator's tables load on first use

        c = self.cfg
        return builtin_splits(c.builtin_train, c.builtin_valid, c.builtin_test, c.builtin_seed)[split]

    def card_lines(self) -> list[str]:
        c = self.cfg
        return [
            f"- generated pairs: {c.builtin_train} train, {c.builtin_valid} valid, {c.builtin_test} test (seed {c.builtin_seed})"
        ]


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


@register
class Files(Source):
    """Local files per split (data.format): text pairs aligned by line, a TSV or JSON lines."""

    name = "files"
    can_stream = can_cache = True
    split_keys = (
        "name",
        "format",
        "src_lang",
        "tgt_lang",
        "test_src",
        "test_tgt",
        "test_file",
        "translation_field",
        "src_field",
        "tgt_field",
    )
    # keys that change which pairs the training files give: part of the cache's key
    reading = ("format", "src_lang", "tgt_lang", "translation_field", "src_field", "tgt_field", "dedup")

    def named_files(self, split: str) -> list[str | None]:
        c = self.cfg
        if c.format == "text":
            return [getattr(c, f"{split}_src"), getattr(c, f"{split}_tgt")]
        return [getattr(c, f"{split}_file")]

    def paths(self, split: str) -> list[str]:
        """The files holding ``split``, checked to be set."""
        c, files = self.cfg, self.named_files(split)
        if c.format == "text" and not all(files):
            raise UserError(f"data.{split}_src and data.{split}_tgt must be set for data.format=text")
        if c.format not in tuple(DataFormat):
            raise UserError(f"data.format={c.format!r}: expected one of {', '.join(DataFormat)}")
        if not all(files):
            raise UserError(f"data.{split}_file must be set for data.format={c.format}")
        return [f for f in files if f]

    def read(self, split: str) -> Iterator[Pair]:
        paths = self.paths(split)
        if self.cfg.format == "text":
            return read_text_pair(*paths)
        return read_tsv(paths[0]) if self.cfg.format == "tsv" else read_jsonl(paths[0], self.cfg)

    def stream(self, shuffle_seed: int | None = None) -> Iterator[Pair]:
        pairs = self.iter_train()
        yield from pairs if shuffle_seed is None else shuffle_buffered(pairs, self.cfg.shuffle_buffer, shuffle_seed)

    def identity(self) -> dict:
        files = [file_identity(p) for p in self.paths("train")]
        return {"files": files} | {k: getattr(self.cfg, k) for k in self.reading}

    def card_lines(self) -> list[str]:
        return [f"- {split}: " + ", ".join(f"`{f}`" for f in self.named_files(split)) for split in SPLITS]


@register
class Hub(Source):
    """A Hugging Face dataset (data.hub_name: a hub name, or a local dataset directory)."""

    name = "hub"
    can_stream = True
    split_keys = (
        "name",
        "hub_name",
        "hub_config",
        "src_lang",
        "tgt_lang",
        "test_split",
        "translation_field",
        "src_field",
        "tgt_field",
        "streaming",
    )

    def dataset(self, split_name: str, streaming: bool) -> Any:
        """``datasets.load_dataset``, with a one-line error naming the dataset and split."""
        import datasets

        c = self.cfg
        if not c.hub_name:
            raise UserError("data.hub_name is required when data.source=hub")
        try:
            return datasets.load_dataset(c.hub_name, c.hub_config, split=split_name, streaming=streaming)
        except Exception as e:  # datasets raises many types; the user needs the name and the reason
            raise UserError(
                f"data.hub_name={c.hub_name!r} split {split_name!r}: cannot load ({first_line(e)})"
            ) from None

    def read(self, split: str) -> list[Pair]:
        c = self.cfg
        split_name = {"train": c.train_split, "valid": c.valid_split, "test": c.test_split}[split]
        where = f"{c.hub_name}[{split_name}]"
        return [pair_from_record(r, c, f"{where} row {i}") for i, r in enumerate(self.dataset(split_name, c.streaming))]

    def stream(self, shuffle_seed: int | None = None) -> Iterator[Pair]:
        c = self.cfg
        ds = self.dataset(c.train_split, streaming=True)
        if shuffle_seed is not None:
            ds = ds.shuffle(seed=shuffle_seed, buffer_size=c.shuffle_buffer)
        where = f"{c.hub_name}[{c.train_split}]"
        for i, record in enumerate(ds):
            src, tgt = (side.strip() for side in pair_from_record(record, c, f"{where} row {i}"))
            if src and tgt:
                yield src, tgt

    def tokenizer_pairs(self) -> Iterable[Pair]:
        """The stream's first data.tokenizer_sample pairs (a hub stream is read once more to sample it)."""
        return itertools.islice(self.stream(), self.cfg.tokenizer_sample)

    def origin(self) -> str:
        return str(self.cfg.hub_name)

    def card_lines(self) -> list[str]:
        c = self.cfg
        return [
            f"- dataset `{c.hub_name}` config `{c.hub_config}`, splits {c.train_split} / {c.valid_split} / {c.test_split}"
        ]


class Mixture(Source):
    """The corpora of a multilingual run (data.corpora, or one corpus with data.tgt_lang_tag),
    each read by its own source in its training direction, in memory; chosen by
    ``source_for``, not by a data.source name."""

    split_keys = ("corpora", "tgt_lang_tag", "sampling_temperature")  # on top of the top-level source's

    def __init__(self, cfg: DataConfig, runs: list[Corpus]):
        super().__init__(cfg)
        self.members = [(c, self.member_source(c, i)) for i, c in enumerate(runs)]

    def member_source(self, corpus: Corpus, i: int) -> Source:
        try:
            return corpus_source(corpus.cfg)
        except UserError as e:
            raise UserError(f"data.corpora[{i}]: {e}" if self.cfg.corpora else str(e)) from None

    def read(self, split: str) -> Iterator[Pair]:
        for c, source in self.members:
            yield from reversed_pairs(source.read(split)) if c.reverse else source.read(split)

    def check_training(self, trainer: TrainerConfig) -> None:
        refuse_synthetic_with(self.cfg, "data.corpora")
        if trainer.bidirectional_epochs:
            raise UserError(
                "trainer.bidirectional_epochs does not tag the reversed pairs: with data.corpora add each "
                "corpus reversed as an entry with reverse: true"
            )

    def parts(self, split: str) -> list[Part]:
        """Each corpus's clean pairs in its training direction (train: data.dedup applies)."""
        out = []
        for c, source in self.members:
            pairs = source.train_pairs() if split == "train" else source.load(split)
            tag = c.tgt if self.cfg.tgt_lang_tag else None
            out.append(Part(c.cfg, c.pair, tag, reversed_pairs(pairs) if c.reverse else pairs))
        return out

    def train_parts(self) -> list[Part]:
        return self.parts("train")
