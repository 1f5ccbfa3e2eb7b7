"""Data sources as one interface: a source registered from outside the package (here, in this
file) trains, validates, streams, is scored and gets its run card lines with no edit in the
package; an unknown ``data.source`` is one line listing the registered names, before any work;
how the training split is held is chosen apart from the source, by what it can do."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import DictConfig

from transformer.config import DataConfig
from transformer.data.sources import SOURCES, Source, corpus_source, register, shuffle_buffered, source_for
from transformer.data.storage import Storage, storage
from transformer.errors import UserError
from transformer.report import write_run_report
from transformer.train import loop

EN = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DE = ("null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun")


@register
class Digits(Source):
    """Digit words -> German digit words, as a user's own source would be written. Its sizes
    borrow the builtin_* keys (a source of the package adds its own keys to DataConfig)."""

    name = "digits"
    can_stream = True
    split_keys = ("name", "builtin_train", "builtin_valid", "builtin_test", "builtin_seed")

    def read(self, split: str) -> Iterator[tuple[str, str]]:
        c = self.cfg
        rng = random.Random(f"{c.builtin_seed}/{split}")
        for _ in range({"train": c.builtin_train, "valid": c.builtin_valid, "test": c.builtin_test}[split]):
            digits = [rng.randrange(10) for _ in range(rng.randint(1, 5))]
            yield " ".join(EN[d] for d in digits), " ".join(DE[d] for d in digits)

    def stream(self, shuffle_seed: int | None = None) -> Iterator[tuple[str, str]]:
        pairs = self.iter_train()
        yield from pairs if shuffle_seed is None else shuffle_buffered(pairs, self.cfg.shuffle_buffer, shuffle_seed)

    def origin(self) -> str:
        return "digit words"

    def card_lines(self) -> list[str]:
        return [f"- digit words: {self.cfg.builtin_train} train pairs (seed {self.cfg.builtin_seed})"]


class Unstreamable(Digits):
    name = "digits_in_memory"
    can_stream = False


register(Unstreamable)


def digits_cfg(cfg: DictConfig, *, steps: int = 10) -> DictConfig:
    cfg.data.source, cfg.data.name = "digits", "digits"
    cfg.trainer.max_steps, cfg.trainer.eval_every = steps, steps
    return cfg


def test_a_source_registered_outside_the_package_trains_and_is_scored(tiny_cfg: DictConfig) -> None:
    from transformer.evaluate import train_and_test as train

    cfg = digits_cfg(tiny_cfg)
    source = corpus_source(DataConfig(source="digits", builtin_valid=20, builtin_test=20))
    trainer = loop.Trainer(cfg)
    assert trainer.data.storage is Storage.MEMORY  # it cannot be cached: data.cache=true keeps it in memory
    assert trainer.data.valid_refs == [t for _, t in source.load("valid")]
    targets = trainer.tokenizer.decode_tgt([e.tgt for e in trainer.data.train_examples])
    assert len(targets) == 200 and {w for t in targets for w in t.split()} == set(DE)  # the source's pairs
    metrics = train(cfg)
    assert metrics["test"]["data"] == "digits.test" and metrics["test"]["sentences"] == 20
    card = write_run_report(cfg.run_dir, cfg, metrics)["card"].read_text(encoding="utf-8")
    assert "source `digits`" in card and "- digit words: 200 train pairs (seed 1234)" in card
    assert "data=digits" in card and "data.builtin_test=20" in card  # its split_keys rebuild the test split


def test_a_registered_source_that_can_stream_is_streamed(tiny_cfg: DictConfig) -> None:
    cfg = digits_cfg(tiny_cfg)
    cfg.data.streaming = True
    data = loop.Trainer(cfg).data
    assert data.storage is Storage.STREAM and len(data.train_examples) == 0
    seen = Counter(tuple(e.tgt) for batch in data.epoch_batches(0) for e in batch)
    pairs = corpus_source(DataConfig(source="digits", builtin_train=200)).train_pairs()
    assert seen == Counter(map(tuple, data.tokenizer.encode_tgt([t for _, t in pairs])))  # every pair, once


def test_an_unknown_source_is_one_line_naming_the_registered_ones_before_any_work(tiny_cfg: DictConfig) -> None:
    tiny_cfg.data.source = "web"
    with pytest.raises(UserError, match=r"^data.source='web': expected one of builtin, files, hub, digits") as err:
        loop.Trainer(tiny_cfg)
    assert "\n" not in str(err.value) and not Path(tiny_cfg.run_dir, "spm.model").exists()
    assert list(SOURCES)[:3] == ["builtin", "files", "hub"]


@pytest.mark.parametrize(
    ("data", "need_pairs", "expected"),
    [
        (DataConfig(source="files"), False, Storage.CACHE),
        (DataConfig(source="files"), True, Storage.MEMORY),  # BiT needs the text
        (DataConfig(source="files", cache=False), False, Storage.MEMORY),
        (DataConfig(source="files", streaming=True), False, Storage.STREAM),
        (DataConfig(source="files", bt_file="bt.tsv"), False, Storage.MEMORY),  # synthetic pairs mix in memory
        (DataConfig(source="builtin"), False, Storage.MEMORY),
        (DataConfig(source="hub", streaming=True), False, Storage.STREAM),
        (DataConfig(source="hub"), False, Storage.MEMORY),
        (DataConfig(source="digits", streaming=True), False, Storage.STREAM),
        (DataConfig(source="digits"), False, Storage.MEMORY),
    ],
)
def test_storage_follows_the_keys_and_what_the_source_can_do(
    data: DataConfig, need_pairs: bool, expected: Storage
) -> None:
    assert storage(corpus_source(data), need_pairs) is expected


def test_streaming_a_source_that_cannot_stream_names_those_that_can() -> None:
    for name in ("builtin", "digits_in_memory"):
        with pytest.raises(
            UserError, match=rf"^data.streaming=true needs data.source=files or hub or digits \(got '{name}'\)"
        ):
            storage(corpus_source(DataConfig(source=name, streaming=True)))


def test_the_run_source_is_the_mixture_only_with_corpora_or_tags() -> None:
    assert type(source_for(DataConfig(source="digits"))) is Digits
    mixture = source_for(DataConfig(source="digits", tgt_lang_tag=True, builtin_valid=3))
    assert [(p.pair, p.tag, len(p.pairs)) for p in mixture.parts("valid")] == [("en-de", "de", 3)]
    entries = [{"src_lang": "en", "tgt_lang": "de", "source": "digits"}, {"src_lang": "en", "tgt_lang": "de"}]
    mixed = source_for(DataConfig(corpora=entries, builtin_test=4))
    assert [type(s) for _, s in mixed.members] == [Digits, type(corpus_source(DataConfig()))]
    assert [len(p.pairs) for p in mixed.parts("test")] == [4, 4]
