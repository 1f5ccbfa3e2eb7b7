"""Corpus reading, BPE and batching: every reader gives the same pairs, tokenization round
trips, and batches respect their budget while covering each example exactly once."""

from __future__ import annotations

import gzip
import io
import json
import logging
import random
from pathlib import Path

import pytest
import torch

from transformer.config import DataConfig
from transformer.data.batching import Example, collate, encode_examples, shard, token_batches
from transformer.data.builtin import builtin_splits
from transformer.data.corpus import clean_pairs, load_files, open_text, text_blocks
from transformer.data.sources import load_split
from transformer.data.tokenizer import Tokenizer, build_tokenizer
from transformer.errors import UserError
from transformer.vocab import BOS, EOS, PAD, UNK

PAIRS = [
    ("I have two red apples.", "Ich habe zwei rote Äpfel."),
    ("The dog is big.", "Der Hund ist groß."),
    ("twenty-one", "einundzwanzig"),
]
ROUND_TRIP = [
    "Ich habe zwei rote Äpfel.",
    "Der Hund ist groß.",
    "dreihundertfünfundvierzig",
    "The twelve cups are new.",
]


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, str]]:
    return builtin_splits(300, 1, 1, 7)["train"] + PAIRS


@pytest.fixture(scope="module")
def joint(corpus) -> Tokenizer:
    return build_tokenizer(corpus, vocab_size=300, joint=True, max_sentences=10_000)


@pytest.fixture(scope="module")
def separate(corpus) -> Tokenizer:
    return build_tokenizer(corpus, vocab_size=200, joint=False, max_sentences=10_000)


# tokenizer ---------------------------------------------------------------------------


@pytest.mark.parametrize("sentence", ROUND_TRIP)
def test_bpe_round_trip(joint: Tokenizer, separate: Tokenizer, sentence: str) -> None:
    for tok in (joint, separate):
        ids = tok.encode_tgt([sentence])[0]
        assert UNK not in ids
        assert tok.decode_tgt([ids]) == [sentence]
    src_ids = joint.encode_src([sentence])[0]
    assert joint.decode_tgt([src_ids]) == [sentence]  # one vocabulary for both sides


def test_special_ids_are_fixed(joint: Tokenizer, separate: Tokenizer) -> None:
    for spm in (joint.src, separate.src, separate.tgt):
        assert (spm.pad_id(), spm.unk_id(), spm.bos_id(), spm.eos_id()) == (PAD, UNK, BOS, EOS)
        assert [spm.id_to_piece(i) for i in (PAD, UNK, BOS, EOS)] == ["<pad>", "<unk>", "<s>", "</s>"]
    src, tgt = joint.encode_src(["twenty-one"])[0], joint.encode_tgt(["einundzwanzig"])[0]
    assert src[-1] == EOS and BOS not in src
    assert tgt[0] == BOS and tgt[-1] == EOS
    assert min(src[:-1] + tgt[1:-1]) > EOS  # pieces never use a special id
    assert joint.decode_tgt([[BOS, *tgt[1:-1], EOS, PAD, PAD]]) == ["einundzwanzig"]


def test_joint_and_separate_vocabularies(joint: Tokenizer, separate: Tokenizer, tmp_path: Path) -> None:
    assert joint.joint and joint.src_vocab_size == joint.tgt_vocab_size
    assert not separate.joint
    assert separate.src is not separate.tgt
    # the English model never saw German letters, the German model did
    assert UNK in separate.encode_src(["groß"])[0]
    assert UNK not in separate.encode_tgt(["groß"])[0]
    for tok, files in ((joint, {"spm.model"}), (separate, {"spm.src.model", "spm.tgt.model"})):
        directory = tmp_path / ("joint" if tok.joint else "separate")
        tok.save(directory)
        assert {p.name for p in directory.iterdir()} == files
        for again in (Tokenizer.load(directory), Tokenizer.from_state(tok.to_state())):
            assert again.joint == tok.joint
            assert again.encode_src(ROUND_TRIP) == tok.encode_src(ROUND_TRIP)
            assert again.encode_tgt(ROUND_TRIP) == tok.encode_tgt(ROUND_TRIP)
    assert Tokenizer.load(tmp_path / "nothing") is None


# batching ----------------------------------------------------------------------------


def random_lengths(n: int, seed: int) -> list[tuple[int, int]]:
    """Source lengths 1..40, target lengths close to them (as in a real corpus)."""
    rng = random.Random(seed)
    sources = [rng.randint(1, 40) for _ in range(n)]
    lengths = [(s, max(1, s + rng.randint(-3, 3))) for s in sources]
    lengths[5] = (150, 20)  # longer than the budget on its own
    return lengths


def test_token_batches_respect_the_budget_and_cover_each_example_once() -> None:
    lengths, budget = random_lengths(500, 1), 128
    batches = token_batches(lengths, budget, seed=1, epoch=0)
    for batch in batches:
        longest = max(max(lengths[i]) for i in batch)
        assert len(batch) * longest <= budget or len(batch) == 1
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [5] in batches  # the over-budget example travels alone


def test_token_batches_are_a_function_of_seed_and_epoch() -> None:
    lengths = random_lengths(300, 2)
    first = token_batches(lengths, 200, seed=1, epoch=0)
    assert token_batches(lengths, 200, seed=1, epoch=0) == first
    assert token_batches(lengths, 200, seed=1, epoch=1) != first
    assert token_batches(lengths, 200, seed=2, epoch=0) != first
    unshuffled = token_batches(lengths, 200, seed=1, epoch=0, shuffle=False)
    assert token_batches(lengths, 200, seed=9, epoch=3, shuffle=False) == unshuffled


def test_token_batches_group_similar_lengths() -> None:
    lengths = random_lengths(300, 3)
    batches = token_batches(lengths, 400, seed=1, epoch=0)
    padded = sum(len(b) * max(max(lengths[i]) for i in b) for b in batches)
    real = sum(max(lengths[i]) for b in batches for i in b)
    assert real / padded > 0.8  # length bucketing: little padding (random grouping: ~0.5)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_gives_disjoint_equal_shares(world: int) -> None:
    batches = [[i] for i in range(11)]
    shares = [shard(batches, rank, world) for rank in range(world)]
    assert len({len(s) for s in shares}) == 1
    assert len(shares[0]) == 11 // world
    seen = [b[0] for s in shares for b in s]
    assert len(seen) == len(set(seen)) == world * (11 // world)


def test_collate_shifts_targets_right() -> None:
    examples = [Example([5, 6, EOS], [BOS, 7, 8, 9, EOS]), Example([5, EOS], [BOS, 7, EOS])]
    batch = collate(examples)
    assert batch.src.tolist() == [[5, 6, EOS], [5, EOS, PAD]]
    assert batch.tgt_in.tolist() == [[BOS, 7, 8, 9], [BOS, 7, EOS, PAD]]
    assert batch.tgt_out.tolist() == [[7, 8, 9, EOS], [7, EOS, PAD, PAD]]
    assert batch.n_tokens == int((batch.tgt_out != PAD).sum()) == 6
    assert batch.src.dtype == batch.tgt_in.dtype == torch.long


def test_over_long_pairs_are_dropped_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    src = [[4] * n + [EOS] for n in (3, 10, 4, 2)]
    tgt = [[BOS] + [5] * n + [EOS] for n in (3, 2, 12, 2)]
    with caplog.at_level(logging.WARNING):
        kept = encode_examples(src, tgt, max_len=8, name="corpus train")
    assert [len(e.src) for e in kept] == [4, 3]
    assert "corpus train: dropped 2 of 4 pairs longer than data.max_len=8" in caplog.text


def test_empty_lines_are_skipped_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    pairs = [("a", "b"), ("", "x"), (" c ", " d "), ("y", "  "), ("", "")]
    with caplog.at_level(logging.WARNING):
        assert clean_pairs(pairs, "mine train") == [("a", "b"), ("c", "d")]
    assert "mine train: skipped 3 pairs with an empty side" in caplog.text


# readers -----------------------------------------------------------------------------


def write_text(path: Path, lines: list[str]) -> str:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return str(path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_text_pair_reader(tmp_path: Path, suffix: str) -> None:
    src = write_text(tmp_path / f"train.en{suffix}", [s for s, _ in PAIRS] + [""])
    tgt = write_text(tmp_path / f"train.de{suffix}", [t for _, t in PAIRS] + ["leer"])
    cfg = DataConfig(source="files", format="text", train_src=src, train_tgt=tgt)
    assert load_split(cfg, "train") == PAIRS


def test_text_reader_handles_crlf_and_no_final_newline(tmp_path: Path) -> None:
    (tmp_path / "a.en").write_bytes(b"one\r\ntwo")
    (tmp_path / "a.de").write_bytes(b"eins\r\nzwei")
    cfg = DataConfig(source="files", train_src=str(tmp_path / "a.en"), train_tgt=str(tmp_path / "a.de"))
    assert load_split(cfg, "train") == [("one", "eins"), ("two", "zwei")]


def test_byte_order_mark_is_dropped(tmp_path: Path) -> None:
    """Editors on Windows often start UTF-8 files with a BOM; it must not become text."""
    path = tmp_path / "train.jsonl"
    path.write_bytes(
        "\ufeff".encode("utf-8") + json.dumps({"translation": {"en": "a", "de": "b"}}).encode("utf-8") + b"\n"
    )
    assert load_split(DataConfig(source="files", format="jsonl", train_file=str(path)), "train") == [("a", "b")]
    (tmp_path / "a.en").write_bytes("\ufeffone\n".encode("utf-8"))
    (tmp_path / "a.de").write_bytes(b"eins\n")
    cfg = DataConfig(source="files", train_src=str(tmp_path / "a.en"), train_tgt=str(tmp_path / "a.de"))
    assert load_split(cfg, "train") == [("one", "eins")]


def test_block_reading_equals_reading_line_by_line(tmp_path: Path) -> None:
    """Blocks of a few bytes (many boundaries) give the lines, numbers and errors of a
    line-by-line reader: BOM, CRLF, a lone CR inside a line, blank lines, no final newline."""
    raw = "\ufeffeins\r\nzwei\rdrei\n\n\u00fcber \u2028 x\r\r\nletzte".encode("utf-8")
    path = tmp_path / "a.txt"
    path.write_bytes(raw)
    expected = [line.rstrip(b"\r\n").decode("utf-8") for line in io.BytesIO(raw.removeprefix(b"\xef\xbb\xbf"))]
    for block in (1, 5, 1 << 20):
        got = [(first + k, line) for first, lines in text_blocks(str(path), block) for k, line in enumerate(lines)]
        assert got == list(enumerate(expected, start=1))
    assert list(open_text(str(path))) == list(enumerate(expected, start=1))
    path.write_bytes(b"ok\nfine\nbad \xff\n")
    for block in (1, 1 << 20):
        with pytest.raises(UserError, match=r"a.txt:3: not valid UTF-8 \(invalid start byte at byte 4\)"):
            list(text_blocks(str(path), block))


def test_tsv_reader(tmp_path: Path) -> None:
    path = write_text(tmp_path / "valid.tsv", [f"{s}\t{t}" for s, t in PAIRS])
    cfg = DataConfig(source="files", format="tsv", valid_file=path)
    assert load_split(cfg, "valid") == PAIRS


def test_jsonl_reader_translation_dict_and_flat_columns(tmp_path: Path) -> None:
    nested = write_text(
        tmp_path / "test.jsonl", [json.dumps({"translation": {"en": s, "de": t}}) for s, t in PAIRS] + [""]
    )
    cfg = DataConfig(source="files", format="jsonl", test_file=nested)
    assert load_split(cfg, "test") == PAIRS
    flat = write_text(
        tmp_path / "flat.jsonl", [json.dumps({"source": s, "target": t, "id": i}) for i, (s, t) in enumerate(PAIRS)]
    )
    cfg = DataConfig(
        source="files", format="jsonl", test_file=flat, translation_field=None, src_field="source", tgt_field="target"
    )
    assert load_split(cfg, "test") == PAIRS


def test_reversed_direction_reads_the_other_side(tmp_path: Path) -> None:
    path = write_text(tmp_path / "train.jsonl", [json.dumps({"translation": {"en": s, "de": t}}) for s, t in PAIRS])
    cfg = DataConfig(source="files", format="jsonl", train_file=path, src_lang="de", tgt_lang="en")
    assert load_split(cfg, "train") == [(t, s) for s, t in PAIRS]


def test_hub_reader_on_a_local_dataset_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``datasets.load_dataset`` on a local folder: the hub code path, offline."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    directory = tmp_path / "my_corpus"
    directory.mkdir()
    for split in ("train", "validation", "test"):
        rows = [{"translation": {"en": f"{s} ({split})", "de": f"{t} ({split})"}} for s, t in PAIRS]
        write_text(directory / f"{split}.jsonl", [json.dumps(r) for r in rows])
    cfg = DataConfig(name="hub", source="hub", hub_name=str(directory))
    for split, stored in (("train", "train"), ("valid", "validation"), ("test", "test")):
        assert load_split(cfg, split) == [(f"{s} ({stored})", f"{t} ({stored})") for s, t in PAIRS]


def test_builtin_source() -> None:
    cfg = DataConfig(builtin_train=50, builtin_valid=5, builtin_test=5)
    train, valid = load_split(cfg, "train"), load_split(cfg, "valid")
    assert len(train) == 50 and len(valid) == 5
    assert load_split(cfg, "train") == train  # generated deterministically


def test_load_files_keeps_blank_lines_aligned(tmp_path: Path) -> None:
    src = write_text(tmp_path / "in.en", ["a", "", "b"])
    ref = write_text(tmp_path / "in.de", ["x", "y", "z"])
    assert load_files(src, ref) == (["a", "", "b"], ["x", "y", "z"])
    assert load_files(src, None) == (["a", "", "b"], None)


def test_token_batches_of_source_lengths_are_decodings_batches():
    """Decoding batches with the training batcher: source lengths alone, sorted, unshuffled,
    rows x longest within the budget, every index once."""
    lengths = [5, 1, 9, 3, 3, 7, 2, 8]
    batches = token_batches(lengths, 16, 0, 0, shuffle=False)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [lengths[i] for b in batches for i in b] == sorted(lengths)
    assert all(max(lengths[i] for i in b) * len(b) <= 16 for b in batches)
    assert batches == token_batches([(n, 0) for n in lengths], 16, 5, 3, shuffle=False)
