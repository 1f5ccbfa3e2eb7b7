"""Corpora larger than memory: the memory-mapped cache (hits, misses, corruption), cached ==
uncached training, exact resume from the cache, numpy batching == the list batching it
replaced, streaming local files over two ranks, the length-ratio and duplicate filters, and
the reproducible BPE sample."""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig

from conftest import compose_config
from transformer.config import DataConfig
from transformer.data.batching import balanced_shard, token_batches
from transformer.data.builtin import builtin_splits
from transformer.data.cache import CachedCorpus, open_corpus
from transformer.data.sources import corpus_source, load_split, load_train_pairs
from transformer.data.storage import Storage, train_examples
from transformer.data.tokenizer import build_tokenizer, sample_pairs
from transformer.errors import UserError
from transformer.train import loop


def reference_token_batches(lengths, max_tokens, seed, epoch, shuffle=True):
    """token_batches as it was before it took numpy arrays: the order resumes depend on."""
    rng = random.Random(seed * 100003 + epoch)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    order.sort(key=lambda i: (lengths[i][0], lengths[i][1]))
    batches, current, longest = [], [], 0
    for i in order:
        size = max(lengths[i])
        if current and max(longest, size) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, size)
    if current:
        batches.append(current)
    if shuffle:
        rng.shuffle(batches)
    return batches


@pytest.mark.parametrize("n", [0, 1, 9, 3000])
def test_numpy_lengths_batch_exactly_as_lists_did(n: int) -> None:
    rng = random.Random(n)
    lengths = [(rng.randint(1, 60), rng.randint(1, 60)) for _ in range(n)]
    for seed, epoch, shuffle in ((1, 0, True), (7, 3, True), (1, 0, False)):
        expected = reference_token_batches(lengths, 300, seed, epoch, shuffle)
        assert token_batches(lengths, 300, seed, epoch, shuffle) == expected
        assert token_batches(np.array(lengths, dtype=np.int32).reshape(-1, 2), 300, seed, epoch, shuffle) == expected


def test_balanced_shard_places_every_index_once() -> None:
    batches = [[0, 1, 2], [3], [4, 5], [6], [7, 8, 9, 10]]
    for world in (1, 2, 3, 4):
        shares = [balanced_shard(batches, r, world) for r in range(world)]
        assert len({len(s) for s in shares}) == 1
        assert sorted(i for s in shares for b in s for i in b) == list(range(11))


# a small corpus on disk -------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> str:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return str(path)


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """builtin pairs as text files: train (with a repeated pair and a lopsided one), valid, test."""
    splits = builtin_splits(200, 20, 20, 1234)
    splits["train"] += splits["train"][:3] + [("one", "ein sehr sehr langer Satz mit sehr vielen vielen Wörtern darin")]
    for split, pairs in splits.items():
        write_lines(tmp_path / f"{split}.en", [s for s, _ in pairs])
        write_lines(tmp_path / f"{split}.de.gz", [t for _, t in pairs])
    return tmp_path


def files_overrides(directory: Path) -> list[str]:
    return ["data.source=files", "data.format=text"] + [
        f"data.{split}_{side}={directory / f'{split}.{lang}'}"
        for split in ("train", "valid", "test")
        for side, lang in (("src", "en"), ("tgt", "de.gz"))
    ]


def tiny_files(run_dir: Path, corpus: Path, *overrides: str) -> DictConfig:
    return compose_config(
        "train",
        [
            "experiment=tiny",
            "evaluate_test=false",
            f"run_dir={run_dir}",
            *files_overrides(corpus),
            "trainer.log_every=1",
            "trainer.eval_every=1000",
            "trainer.schedule=constant",
            *overrides,
        ],
    )


def data_cfg(corpus: Path, *overrides: str) -> DataConfig:
    from omegaconf import OmegaConf

    return OmegaConf.to_object(compose_config("train", ["experiment=tiny", *files_overrides(corpus), *overrides]).data)


def losses(run_dir: Path) -> list[tuple[int, int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(r["step"], r["epoch"], r["loss"]) for r in records if "loss" in r]


def as_tuples(examples) -> list[tuple]:
    return [(tuple(e.src), tuple(e.tgt)) for e in examples]


# the cache ---------------------------------------------------------------------------


def test_cache_hits_and_misses(corpus_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg, root = data_cfg(corpus_dir), tmp_path / "cache"
    tok = build_tokenizer(load_train_pairs(cfg), 200, True, 10_000)
    with caplog.at_level(logging.INFO, logger="transformer"):
        first = open_corpus(corpus_source(cfg), tok, 64, root)
        assert "encoding" in caplog.text
        caplog.clear()
        again = open_corpus(corpus_source(cfg), tok, 64, root)
        assert "encoding" not in caplog.text  # a hit: mapped, not encoded
    assert again.directory == first.directory and as_tuples(again) == as_tuples(first)
    assert isinstance(again.ids["src"], np.memmap) and again.ids["src"].dtype == np.uint16
    source = corpus_source(cfg)
    expected, _ = train_examples(source, Storage.MEMORY, tok, 64, source.train_parts(), root)
    assert as_tuples(first) == as_tuples(expected)  # the same examples, in the same order, as in memory
    assert np.array_equal(first.lengths, [(len(e.src), len(e.tgt) - 1) for e in expected])

    other_tok = build_tokenizer(load_train_pairs(cfg), 150, True, 10_000)
    shorter = open_corpus(source, tok, 12, root)
    assert len({first.directory, open_corpus(source, other_tok, 64, root).directory, shorter.directory}) == 3
    assert len(shorter) < len(first)
    st = os.stat(cfg.train_src)
    os.utime(cfg.train_src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, new identity
    assert open_corpus(source, tok, 64, root).directory != first.directory


def test_encoding_workers_build_the_same_cache(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformer.data import cache

    monkeypatch.setattr(cache, "CHUNK_PAIRS", 17)  # many chunks, handed out across the workers
    tok = build_tokenizer(load_train_pairs(data_cfg(corpus_dir)), 200, True, 10_000)
    built = {
        workers: as_tuples(
            open_corpus(
                corpus_source(data_cfg(corpus_dir, f"data.encode_workers={workers}")), tok, 64, tmp_path / str(workers)
            )
        )
        for workers in (1, 3)
    }
    expected = [(tuple(s), tuple(t)) for s, t in zip(*tok.encode_pairs(load_train_pairs(data_cfg(corpus_dir))))]
    assert built[1] == built[3] == expected
    with pytest.raises(UserError, match="data.encode_workers=-1"):
        open_corpus(corpus_source(data_cfg(corpus_dir, "data.encode_workers=-1")), tok, 64, tmp_path / "bad")


def test_corrupt_cache_is_rebuilt_with_a_warning(
    corpus_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, root = data_cfg(corpus_dir), tmp_path / "cache"
    tok = build_tokenizer(load_train_pairs(cfg), 200, True, 10_000)
    good = as_tuples(open_corpus(corpus_source(cfg), tok, 64, root))
    directory = next(root.glob("train-*"))
    ids = directory / "src.bin"
    damaged = bytearray(ids.read_bytes())
    damaged[10] ^= 0xFF  # one flipped byte: sizes still match
    ids.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING):
        rebuilt = open_corpus(corpus_source(cfg), tok, 64, root)
    assert "src.bin does not match meta.json" in caplog.text and "rebuilding" in caplog.text
    assert as_tuples(rebuilt) == good
    (directory / "meta.json").write_text("{not json", encoding="utf-8")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert as_tuples(open_corpus(corpus_source(cfg), tok, 64, root)) == good
    assert "unreadable" in caplog.text
    assert not list(root.glob("*.tmp-*"))  # no half-built directory left behind


def test_cached_and_uncached_runs_train_identically(corpus_dir: Path, tmp_path: Path) -> None:
    cached = loop.Trainer(tiny_files(tmp_path / "cached", corpus_dir))
    plain = loop.Trainer(tiny_files(tmp_path / "plain", corpus_dir, "data.cache=false"))
    assert isinstance(cached.data.train_examples, CachedCorpus) and isinstance(plain.data.train_examples, list)
    assert cached.data.tokenizer.to_state() == plain.data.tokenizer.to_state()
    for epoch in (0, 1):
        assert [as_tuples(b) for b in cached.data.epoch_batches(epoch)] == [
            as_tuples(b) for b in plain.data.epoch_batches(epoch)
        ]
    assert [as_tuples(b) for b in cached.data.epoch_batches(1, skip=3)] == [
        as_tuples(b) for b in plain.data.epoch_batches(1)
    ][3:]
    loop.train(tiny_files(tmp_path / "cached", corpus_dir, "trainer.max_steps=6"))
    loop.train(tiny_files(tmp_path / "plain", corpus_dir, "data.cache=false", "trainer.max_steps=6"))
    assert losses(tmp_path / "cached") == losses(tmp_path / "plain")
    assert (tmp_path / "cache").is_dir() and len(
        list((tmp_path / "cache").glob("bpe-*"))
    ) == 1  # beside the run directories


def test_resume_from_the_cache_is_exact(corpus_dir: Path, tmp_path: Path) -> None:
    full, split = tmp_path / "full", tmp_path / "split"
    loop.train(tiny_files(full, corpus_dir, "trainer.max_steps=12"))
    loop.train(tiny_files(split, corpus_dir, "trainer.max_steps=5"))
    loop.train(tiny_files(split, corpus_dir, "trainer.max_steps=12", f"trainer.resume={split}"))
    assert losses(split) == losses(full)
    assert losses(full)[-1][1] >= 1  # crossed an epoch boundary
    assert len(list((tmp_path / "cache").glob("train-*"))) == 1  # three runs, one encoding


# filters -----------------------------------------------------------------------------


def test_filters_count_what_they_drop(corpus_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = data_cfg(corpus_dir, "data.dedup=true", "data.max_len_ratio=3")
    raw = load_split(cfg, "train")
    with caplog.at_level(logging.INFO, logger="transformer"):
        pairs = load_train_pairs(cfg)
    assert pairs == list(dict.fromkeys(raw)) and len(raw) - len(pairs) >= 3  # first occurrences, in order
    assert f"dropped {len(raw) - len(pairs)} of {len(raw)} pairs repeating an earlier pair (data.dedup)" in caplog.text
    tok = build_tokenizer(pairs, 200, True, 10_000)
    for source in ("memory", "cache"):
        caplog.clear()
        kept, corpus = Storage(source), corpus_source(cfg)
        with caplog.at_level(logging.WARNING):
            parts = corpus.train_parts() if kept is Storage.MEMORY else []
            examples, _ = train_examples(corpus, kept, tok, 64, parts, tmp_path / "cache")
        assert len(examples) == len(pairs) - 1, source  # the lopsided pair is gone
        assert ("one",) not in [(tok.decode_tgt([e.src])[0],) for e in examples]
        assert f"dropped 1 of {len(pairs)} pairs whose length ratio exceeds data.max_len_ratio=3" in caplog.text, source


def test_bpe_sample_is_reproducible_and_whole_for_small_corpora() -> None:
    pairs = [(f"s{i}", f"t{i}") for i in range(1000)]
    assert sample_pairs(pairs, 1000) == pairs == sample_pairs(iter(pairs), 5000)
    sample = sample_pairs(iter(pairs), 100)
    assert len(sample) == 100 and sample == sample_pairs(pairs, 100)  # same sample from a stream or a list
    assert sample != pairs[:100] and sample == sorted(sample, key=pairs.index)  # random, in corpus order


# streaming local files -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "tsv", "jsonl"])
def test_streamed_files_give_every_pair_once_per_epoch_across_two_ranks(tmp_path: Path, fmt: str) -> None:
    from transformer.data.streaming import stream_batches

    pairs = builtin_splits(301, 1, 1, 5)["train"]
    if fmt == "text":
        files = [
            f"data.train_src={write_lines(tmp_path / 'a.en.gz', [s for s, _ in pairs])}",
            f"data.train_tgt={write_lines(tmp_path / 'a.de', [t for _, t in pairs])}",
        ]
    elif fmt == "tsv":
        tsv = write_lines(tmp_path / "a.tsv.gz", ["\t".join(pair) for pair in pairs])
        files = [f"data.train_file={tsv}"]
    else:
        files = [
            f"data.train_file={write_lines(tmp_path / 'a.jsonl', [json.dumps({'translation': {'en': s, 'de': t}}) for s, t in pairs])}"
        ]
    cfg = data_cfg(
        tmp_path, "data.streaming=true", f"data.format={fmt}", "data.shuffle_buffer=100", "data.max_tokens=256", *files
    )
    source = corpus_source(cfg)
    assert list(source.stream()) == pairs
    tok = build_tokenizer(pairs, 200, True, 10_000)
    expected = Counter(map(tuple, tok.encode_tgt([t for _, t in pairs])))
    one = [tuple(e.tgt) for b in stream_batches(source, tok, 128, seed=1, epoch=0) for e in b]
    assert Counter(one) == expected
    assert one != [
        tuple(e.tgt) for b in stream_batches(source, tok, 128, seed=1, epoch=1) for e in b
    ]  # reshuffled each epoch
    shards = [list(stream_batches(source, tok, 128, seed=1, epoch=0, rank=r, world=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) > 0  # equal counts keep DDP collectives in step
    assert Counter(tuple(e.tgt) for s in shards for b in s for e in b) == expected  # each pair exactly once


def test_streamed_files_train_and_resume_exactly(corpus_dir: Path, tmp_path: Path) -> None:
    stream = ["data.streaming=true", "data.shuffle_buffer=64"]
    full, split = tmp_path / "full", tmp_path / "split"
    loop.train(tiny_files(full, corpus_dir, *stream, "trainer.max_steps=12"))
    loop.train(tiny_files(split, corpus_dir, *stream, "trainer.max_steps=5"))
    loop.train(tiny_files(split, corpus_dir, *stream, "trainer.max_steps=12", f"trainer.resume={split}"))
    assert losses(split) == losses(full)
    assert losses(full)[-1][1] >= 1


# the WMT14 recipe ------------------------------------------------------------------------


@pytest.mark.slow
def test_wmt14_recipe_composes_as_the_paper_and_trains_two_updates(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from bench_data import write_corpus

    recipe = compose_config("train", ["experiment=wmt14_en_de_base"])
    assert (recipe.data.hub_name, recipe.data.hub_config, recipe.data.src_lang, recipe.data.tgt_lang) == (
        "wmt14",
        "de-en",
        "en",
        "de",
    )
    assert (recipe.model.d_model, recipe.model.d_ff, recipe.model.n_heads, recipe.model.n_encoder_layers) == (
        512,
        2048,
        8,
        6,
    )
    assert (recipe.data.vocab_size, recipe.data.joint_vocab, recipe.data.max_tokens * recipe.trainer.update_freq) == (
        32000,
        True,
        25000,
    )
    assert (
        recipe.trainer.schedule,
        recipe.trainer.warmup_steps,
        recipe.trainer.label_smoothing,
        recipe.trainer.average_last,
    ) == ("inverse_sqrt", 4000, 0.1, 5)

    files = write_corpus(tmp_path / "wmt", 300, n_eval=10)
    shrink = [
        "model.d_model=32",
        "model.n_heads=2",
        "model.n_encoder_layers=1",
        "model.n_decoder_layers=1",
        "model.d_ff=64",
        "data.vocab_size=300",
        "data.max_tokens=1024",
        "trainer.update_freq=2",
        "trainer.max_steps=2",
        "trainer.save_every=1",
        "trainer.eval_every=2",
        "trainer.average_last=2",
        "trainer.keep_last=2",
        "trainer.precision=fp32",
        "trainer.compile=false",
        "trainer.device=cpu",
        "trainer.progress=false",
        "trainer.threads=1",
        "decode.beam_size=2",
        "decode.max_len_b=3",
    ]
    data = ["data.source=files", "data.format=text", *(f"{k}={v}" for k, v in files.items())]
    from transformer.evaluate import train_and_test

    metrics = train_and_test(
        compose_config("train", ["experiment=wmt14_en_de_base", f"run_dir={tmp_path / 'run'}", *data, *shrink])
    )
    assert metrics["step"] == 2 and (tmp_path / "run/checkpoints/averaged.pt").exists()
    assert (
        metrics["test"]["bleu_signature"].startswith("nrefs:1")
        and (tmp_path / "run/test.hyp.txt").read_text().count("\n") == 10
    )  # sacreBLEU on the test split
    assert list((tmp_path / "cache").glob("train-*"))  # the recipe's corpus went through the cache


@pytest.mark.slow
def test_ddp_ranks_map_one_cache_and_train_as_one_process(corpus_dir: Path, tmp_path: Path) -> None:
    """Two gloo ranks: rank 0 builds the cache, rank 1 maps it; the updates equal one process
    with update_freq=2. Streamed files also train over two ranks (equal batch counts: no hang)."""
    from training import torchrun

    data = [*files_overrides(corpus_dir), "trainer.schedule=constant", "trainer.max_steps=4"]
    torchrun(tmp_path / "ddp", *data)
    loop.train(tiny_files(tmp_path / "single", corpus_dir, "trainer.update_freq=2", "trainer.max_steps=4"))
    two, one = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert [(s, e) for s, e, _ in two] == [(s, e) for s, e, _ in one]
    assert [loss for _, _, loss in two] == pytest.approx([loss for _, _, loss in one], rel=1e-5)
    assert len(list((tmp_path / "cache").glob("train-*"))) == 1 and not list((tmp_path / "cache").glob("*.tmp-*"))
    torchrun(tmp_path / "stream", *data, "data.streaming=true", "data.shuffle_buffer=64")
    assert [s for s, _, _ in losses(tmp_path / "stream")] == [1, 2, 3, 4]
