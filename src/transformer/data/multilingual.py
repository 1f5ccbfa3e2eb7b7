"""Several corpora in one run (``data.corpora``), each with its language pair: the entries'
configs, the target-language tag that opens a source (``data.tgt_lang_tag``), and which
training examples an epoch draws from each corpus (``data.sampling_temperature``).

An entry starts from its ``preset`` (a data config, ``configs/data/NAME.yaml``) or, without
one, from the top-level data keys; ``src_lang`` and ``tgt_lang`` come from the entry or its
preset, never from a default. Tokenizer and batching keys (``SHARED``) are the top-level
ones for every corpus. Corpora are read into memory (no cache, no streaming) by
``sources.Mixture``, which also checks each entry's ``source``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from transformer.config import CorpusConfig, DataConfig, config_dir, entry_keys, to_dict, validate_section
from transformer.data.batching import Example, encode_examples
from transformer.data.corpus import Pair
from transformer.data.tokenizer import Tokenizer
from transformer.errors import UserError, first_line

# set once on data for every corpus: the tokenizer, batching and the multilingual keys themselves
SHARED = (
    "vocab_size",
    "joint_vocab",
    "tokenizer_sample",
    "max_len",
    "max_tokens",
    "valid_max_sentences",
    "cache_dir",
    "encode_workers",
    "streaming",
    "shuffle_buffer",
    "tgt_lang_tag",
    "sampling_temperature",
    "corpora",
)
NOT_INHERITED = ("src_lang", "tgt_lang", "name", *SHARED)  # an entry without a preset names its own


@dataclass
class Corpus:
    """One corpus of a multilingual run and the direction it is trained in."""

    cfg: DataConfig  # its resolved data config (a CorpusConfig for data.corpora entries)

    @property
    def reverse(self) -> bool:
        """Trained target -> source (an entry's ``reverse``)."""
        return bool(getattr(self.cfg, "reverse", False))

    @property
    def src(self) -> str:
        return self.cfg.tgt_lang if self.reverse else self.cfg.src_lang

    @property
    def tgt(self) -> str:
        """The target language as trained: the tag its sources get."""
        return self.cfg.src_lang if self.reverse else self.cfg.tgt_lang

    @property
    def pair(self) -> str:
        return f"{self.src}-{self.tgt}"


def presets() -> list[str]:
    return sorted(p.stem for p in (Path(config_dir()) / "data").glob("*.yaml"))


def entry_config(data: DataConfig, entry: object, i: int) -> CorpusConfig:
    """``data.corpora[i]`` (a CorpusEntry, or its node before ``typed``) merged onto its preset
    (or the top-level keys) and the shared keys."""
    where = f"data.corpora[{i}]"
    raw = entry_keys(entry)
    if shared := sorted(set(raw) & set(SHARED)):
        raise UserError(f"{where}.{shared[0]}: shared by every corpus; set data.{shared[0]} instead")
    top = to_dict(data)
    preset = raw.get("preset")
    if preset is not None and preset not in presets():
        raise UserError(f"{where}.preset={preset!r}: expected one of {', '.join(presets())}")
    base = (
        OmegaConf.load(Path(config_dir()) / "data" / f"{preset}.yaml")
        if preset
        else {k: v for k, v in top.items() if k not in NOT_INHERITED}
    )
    schema = OmegaConf.structured(CorpusConfig)
    schema.src_lang = schema.tgt_lang = "???"  # each corpus names its languages
    try:
        merged = OmegaConf.merge(schema, base, raw, {k: top[k] for k in SHARED if k != "corpora"})
        for key in ("src_lang", "tgt_lang"):
            if OmegaConf.is_missing(merged, key):
                raise UserError(f"{where}: no {key}; each corpus names its languages ({where}.{key}=...)")
        cfg = OmegaConf.to_object(merged)
        validate_section("data", cfg)
    except (OmegaConfBaseException, UserError) as e:
        raise UserError(f"{where}: {first_line(e)}" if not str(e).startswith(where) else str(e)) from None
    if "name" not in raw:
        cfg.name = f"{preset or top['name']}[{i}]"
    return cfg


def corpora(data: DataConfig) -> list[Corpus]:
    """The run's corpora: data.corpora's entries, or the data config itself when its sources
    are tagged (data.tgt_lang_tag); empty for a plain one-corpus run, which keeps its own path."""
    if data.sampling_temperature <= 0:
        raise UserError(f"data.sampling_temperature={data.sampling_temperature} must be > 0")
    configs = [entry_config(data, raw, i) for i, raw in enumerate(data.corpora)]
    if not configs and data.tgt_lang_tag:
        configs = [DataConfig(**to_dict(data))]
    if configs and data.streaming:
        raise UserError("data.streaming reads one corpus; data.corpora and data.tgt_lang_tag read theirs into memory")
    return [Corpus(c) for c in configs]


def tag_prefix(tokenizer: Tokenizer, tgt_lang: str | None, key: str = "decode.tgt_lang") -> list[int]:
    """The ids opening every source of a translation into ``tgt_lang``: its tag for a tagged
    model ([] otherwise); ``key`` names the setting in errors."""
    langs = tokenizer.languages
    if tgt_lang is None:
        if len(langs) > 1:
            raise UserError(f"this model translates into {', '.join(langs)}: pick one with {key}=LANG")
        return list(tokenizer.tags.values())
    if tgt_lang not in tokenizer.tags:
        known = ", ".join(langs) if langs else "no tagged languages (trained without data.tgt_lang_tag)"
        raise UserError(f"{key}={tgt_lang!r}: the model knows {known}")
    return [tokenizer.tags[tgt_lang]]


def corpus_prefix(tokenizer: Tokenizer, tgt_lang: str | None, pair: str) -> list[int]:
    """The tag ids opening the sources of a corpus trained into ``tgt_lang`` ([] untagged)."""
    if tgt_lang is None:
        return []
    if tgt_lang not in tokenizer.tags:
        raise UserError(
            f"data.tgt_lang_tag: the run's tokenizer has no tag <2{tgt_lang}> for {pair} (it has "
            f"{', '.join(tokenizer.languages) or 'none'}; trainer.init_from and resume bring their own)"
        )
    return [tokenizer.tags[tgt_lang]]


def encode_corpus(
    tokenizer: Tokenizer, pairs: Sequence[Pair], prefix: list[int], max_len: int, name: str, max_ratio: float = 0.0
) -> tuple[list[Example], list[list[int]]]:
    """Examples of ``pairs`` with ``prefix`` (the tag) opening each source, filtered as a
    single corpus is, and every source's ids (BLEU needs every sentence)."""
    src, tgt = tokenizer.encode_pairs(pairs)
    src = [prefix + ids for ids in src] if prefix else src
    return encode_examples(src, tgt, max_len, name, max_ratio), src


def corpus_shares(sizes: Sequence[int], temperature: float) -> np.ndarray:
    """Each corpus's share of an epoch: p_i ~ n_i^(1/T) (T=1: as its size; larger T: flatter)."""
    weights = np.asarray(sizes, dtype=np.float64) ** (1.0 / temperature)
    return weights / weights.sum()


def epoch_indices(sizes: Sequence[int], temperature: float, seed: int, epoch: int) -> np.ndarray:
    """Indices into the corpora's examples, one after the other, that ``epoch`` trains on: as
    many draws as there are examples, round(p_i * total) from corpus i. A corpus drawn more
    often than its size repeats whole and then draws the rest without replacement; one drawn
    less, a subset. A pure function of (sizes, T, seed, epoch); T=1 is every example once."""
    parts, start = [np.zeros(0, dtype=np.int64)], 0
    if sum(sizes) == 0:
        return parts[0]
    counts = np.rint(corpus_shares(sizes, temperature) * sum(sizes)).astype(np.int64).tolist()
    rng = np.random.default_rng([seed, epoch])
    for n, m in zip(sizes, counts):
        if n:
            whole, rest = divmod(m, n)
            parts += [start + np.tile(np.arange(n), whole), start + np.sort(rng.choice(n, rest, replace=False))]
        start += n
    return np.concatenate(parts)
