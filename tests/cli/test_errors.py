"""Mistakes a user can make give one ``UserError`` naming the file, line or key (the CLIs
print it as ``error: ...`` and exit with 2), never a traceback from deep inside."""

from __future__ import annotations

import gzip
import logging
import re
from pathlib import Path

import pytest

from transformer.checkpoint import atomic_save, load_checkpoint
from transformer.config import DataConfig, ModelConfig
from transformer.data.builtin import builtin_splits
from transformer.data.sources import load_split
from transformer.data.tokenizer import build_tokenizer
from transformer.decode.translator import Translator
from transformer.errors import UserError
from transformer.evaluate import evaluate
from transformer.model import build_model
from transformer.train.loop import train


def text_files(tmp_path: Path, src: bytes, tgt: bytes, suffix: str = "") -> DataConfig:
    paths = []
    for name, data in (("train.en", src), ("train.de", tgt)):
        path = tmp_path / (name + suffix)
        path.write_bytes(gzip.compress(data) if suffix == ".gz" else data)
        paths.append(str(path))
    return DataConfig(name="mine", source="files", format="text", train_src=paths[0], train_tgt=paths[1])


# corpora -----------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    cfg = DataConfig(source="files", train_src=str(tmp_path / "nope.en"), train_tgt=str(tmp_path / "nope.de"))
    with pytest.raises(UserError, match=f"^{tmp_path / 'nope.en'}: file not found$"):
        load_split(cfg, "train")


def test_unset_paths_name_the_keys() -> None:
    with pytest.raises(UserError, match="data.valid_src and data.valid_tgt must be set"):
        load_split(DataConfig(source="files"), "valid")
    with pytest.raises(UserError, match="data.test_file must be set for data.format=tsv"):
        load_split(DataConfig(source="files", format="tsv"), "test")
    with pytest.raises(UserError, match="data.source='web'"):
        load_split(DataConfig(source="web"), "train")
    with pytest.raises(UserError, match="data.format='csv'"):
        load_split(DataConfig(source="files", format="csv", train_file="x.csv"), "train")


def test_line_counts_differ(tmp_path: Path) -> None:
    cfg = text_files(tmp_path, b"a\nb\nc\n", b"x\ny\n")
    with pytest.raises(UserError, match=r"train\.en has 3 lines but .*train\.de has 2"):
        load_split(cfg, "train")


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_invalid_utf8_names_file_and_line(tmp_path: Path, suffix: str) -> None:
    cfg = text_files(tmp_path, "one\ntwo\nÄpfel\n".encode("latin-1"), b"eins\nzwei\ndrei\n", suffix)  # a Latin-1 file
    with pytest.raises(UserError, match=rf"^{re.escape(cfg.train_src)}:3: not valid UTF-8"):
        load_split(cfg, "train")


@pytest.mark.parametrize("content", [b"", b"\n  \n\t\n"])
def test_empty_corpus(tmp_path: Path, content: bytes) -> None:
    cfg = text_files(tmp_path, content, content)
    with pytest.raises(UserError, match="mine train: no sentence pairs"):
        load_split(cfg, "train")


def test_malformed_tsv_and_jsonl_name_the_line(tmp_path: Path) -> None:
    tsv = tmp_path / "train.tsv"
    tsv.write_text("a\tb\nno tab here\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"{re.escape(str(tsv))}:2: expected 2 tab-separated fields"):
        load_split(DataConfig(source="files", format="tsv", train_file=str(tsv)), "train")
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"translation": {"en": "a", "de": "b"}}\n{"translation": \n', encoding="utf-8")
    with pytest.raises(UserError, match=rf"{re.escape(str(jsonl))}:2: invalid JSON"):
        load_split(DataConfig(source="files", format="jsonl", train_file=str(jsonl)), "train")
    jsonl.write_text('{"translation": {"en": "a", "fr": "b"}}\n', encoding="utf-8")
    with pytest.raises(
        UserError, match=rf"{re.escape(str(jsonl))}:1: expected field 'translation' holding keys \('en', 'de'\)"
    ):
        load_split(DataConfig(source="files", format="jsonl", train_file=str(jsonl)), "train")


def test_missing_hub_dataset_names_it(tmp_path: Path) -> None:
    cfg = DataConfig(source="hub", hub_name=str(tmp_path / "no_such_dataset"))
    with pytest.raises(UserError, match=r"data.hub_name='.*no_such_dataset' split 'train': cannot load"):
        load_split(cfg, "train")


def test_train_stops_on_bad_data_before_any_work(tiny_cfg, tmp_path: Path) -> None:
    cfg = text_files(tmp_path, b"ok\n\xc3\n", b"gut\nx\n")
    tiny_cfg.data.source, tiny_cfg.data.train_src, tiny_cfg.data.train_tgt = "files", cfg.train_src, cfg.train_tgt
    with pytest.raises(UserError, match=rf"{re.escape(cfg.train_src)}:2: not valid UTF-8"):
        train(tiny_cfg)
    assert not (Path(tiny_cfg.run_dir) / "checkpoints").exists()


def test_evaluate_files_must_align(tiny_run: Path, tmp_path: Path) -> None:
    src, ref = tmp_path / "in.en", tmp_path / "in.de"
    src.write_text("a\nb\n", encoding="utf-8")
    ref.write_text("x\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"in\.en has 2 lines but .*in\.de has 1"):
        evaluate(str(tiny_run), src_file=str(src), ref_file=str(ref), device="cpu")


# checkpoints -------------------------------------------------------------------------


def test_checkpoint_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"{tmp_path / 'run'}: checkpoint not found"):
        Translator.from_checkpoint(tmp_path / "run", device="cpu")
    with pytest.raises(UserError, match=f"{tmp_path}: run directory holds no checkpoints/best.pt"):
        Translator.from_checkpoint(tmp_path, device="cpu")


def test_truncated_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    best = tiny_run / "checkpoints" / "best.pt"
    truncated = tmp_path / "best.pt"
    truncated.write_bytes(best.read_bytes()[:1000])
    with pytest.raises(UserError, match=f"{truncated}: not a readable checkpoint"):
        Translator.from_checkpoint(truncated, device="cpu")


def test_ensemble_member_with_another_vocabulary(tiny_run: Path, tmp_path: Path) -> None:
    """A second run trained with its own tokenizer cannot join the first run's ensemble."""
    ckpt = load_checkpoint(tiny_run / "checkpoints" / "best.pt")
    tokenizer = build_tokenizer(builtin_splits(200, 1, 1, 3)["train"], vocab_size=120, joint=True, max_sentences=1000)
    model_config = {
        **ckpt["model_config"],
        "src_vocab_size": tokenizer.src_vocab_size,
        "tgt_vocab_size": tokenizer.tgt_vocab_size,
    }
    other = {**ckpt, "model_config": model_config, "tokenizer": tokenizer.to_state()}
    other["model"] = build_model(ModelConfig(**model_config)).state_dict()
    atomic_save(other, tmp_path / "other.pt")
    Translator.from_checkpoint(tmp_path / "other.pt", device="cpu")  # fine on its own
    with pytest.raises(UserError, match="does not match the checkpoint's model"):
        Translator.from_checkpoint(tiny_run, device="cpu", ensemble=[tmp_path / "other.pt"])


# decoding ----------------------------------------------------------------------------


def test_over_long_decode_input_is_cut_with_a_warning(tiny_run: Path, caplog: pytest.LogCaptureFixture) -> None:
    translator = Translator.from_checkpoint(tiny_run, device="cpu")
    limit = translator.models[0].cfg.max_positions
    long_line = " ".join(["We see seventy-seven red cars."] * 40)
    assert len(translator.tokenizer.encode_src([long_line])[0]) > limit
    lines = [f"{n} apples" for n in ("one", "two", "three")] * 23 + [long_line]  # the long line is line 70
    with caplog.at_level(logging.WARNING):
        outputs = list(translator.translate_stream(lines, chunk=64, beam_size=1))
    assert len(outputs) == 70 and outputs[-1][0].tokens
    assert re.search(rf"input line 70 has \d+ subwords, more than model.max_positions={limit}", caplog.text)


def test_unknown_decode_option_names_it(tiny_run: Path) -> None:
    translator = Translator.from_checkpoint(tiny_run, device="cpu")
    with pytest.raises(UserError, match="unknown decode option.*beam_width"):
        translator.translate("one", beam_width=3)


# the command line --------------------------------------------------------------------


def assert_one_error_line(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.slow
def test_cli_bad_training_data(cli, tmp_path: Path) -> None:
    (tmp_path / "train.en").write_bytes(b"one\ntw\xffo\n")
    (tmp_path / "train.de").write_bytes(b"eins\nzwei\n")
    result = cli(
        "train",
        "experiment=tiny",
        "data=files",
        "data.train_src=train.en",
        "data.train_tgt=train.de",
        f"run_dir={tmp_path / 'run'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert_one_error_line(result, "train.en:2: not valid UTF-8")


@pytest.mark.slow
def test_cli_unknown_key(cli, tmp_path: Path) -> None:
    result = cli("train", "experiment=tiny", "model.d_modle=3", cwd=tmp_path)
    assert result.returncode != 0
    assert "model.d_modle" in result.stderr and "Traceback" not in result.stderr + result.stdout
    assert not list(tmp_path.iterdir())  # nothing was started


@pytest.mark.slow
def test_cli_truncated_checkpoint(cli, tiny_run: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "best.pt"
    truncated.write_bytes((tiny_run / "checkpoints" / "best.pt").read_bytes()[:5000])
    result = cli("decode", f"checkpoint={truncated}", "sentence=one", cwd=tmp_path)
    assert_one_error_line(result, f"{truncated}: not a readable checkpoint")


@pytest.mark.slow
def test_cli_missing_input_file(cli, tiny_run: Path, tmp_path: Path) -> None:
    result = cli("evaluate", f"checkpoint={tiny_run}", "src_file=missing.en", "ref_file=missing.de", cwd=tmp_path)
    assert_one_error_line(result, "missing.en: file not found")


# settings: each range checked at start-up, naming the key, before any BPE or data work -----

BAD_SETTINGS = [
    ("trainer.lr=-1", "trainer.lr=-1.0 must be > 0"),
    ("trainer.eval_every=0", "trainer.eval_every=0 must be >= 1"),
    ("trainer.log_every=0", "trainer.log_every=0 must be >= 1"),
    ("trainer.update_freq=0", "trainer.update_freq=0 must be >= 1"),
    ("trainer.max_steps=0", "trainer.max_steps=0 must be >= 1"),
    ("trainer.warmup_steps=-5", "trainer.warmup_steps=-5 must be >= 0"),
    ("trainer.label_smoothing=1.5", "trainer.label_smoothing=1.5 must be in [0, 1)"),
    ("trainer.betas=[0.9,1.5]", "trainer.betas=[0.9, 1.5] must each be in [0, 1)"),
    ("data.vocab_size=5", "data.vocab_size=5 must be >= 8"),
    ("data.max_len=0", "data.max_len=0 must be >= 1"),
    ("data.max_tokens=0", "data.max_tokens=0 must be >= 1"),
    ("model.max_positions=0", "model.max_positions=0 must be >= 3"),
    ("model.dropout=1.5", "model.dropout=1.5 must be in [0, 1)"),
    ("model.n_encoder_layers=0", "model.n_encoder_layers=0 must be >= 1"),
    ("decode.top_p=2", "decode.top_p=2.0 must be in (0, 1]"),
    ("decode.max_len_a=-1", "decode.max_len_a=-1.0 must be >= 0"),
]


@pytest.mark.slow
@pytest.mark.parametrize("override, message", BAD_SETTINGS, ids=[o for o, _ in BAD_SETTINGS])
def test_each_bad_setting_is_named_before_any_work(tiny_cfg, override: str, message: str) -> None:
    from conftest import compose_config

    cfg = compose_config("train", ["experiment=tiny", f"run_dir={tiny_cfg.run_dir}", override])
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        train(cfg)
    assert not (Path(tiny_cfg.run_dir) / "spm.model").exists()  # failed before BPE


def test_every_range_names_its_key() -> None:
    """Each key of config.RANGES exists in its section's schema, so the table cannot name a key that is gone."""
    from transformer.config import RANGES, DecodeConfig, TrainerConfig
    from transformer.serve.settings import ServeConfig, ServeRunConfig

    schemas = {"model": ModelConfig, "data": DataConfig, "trainer": TrainerConfig, "decode": DecodeConfig}
    schemas |= {"serve": ServeConfig}
    for section, keys in RANGES.items():
        fields = vars(schemas[section]()) if section else vars(ServeRunConfig())
        assert set(keys) <= set(fields), section


def test_decode_settings_out_of_range_are_refused() -> None:
    from transformer.config import DecodeConfig
    from transformer.decode.spec import check_decode_config

    for key, value, message in [("top_p", 2.0, "must be in (0, 1]"), ("max_len_a", -1.0, "must be >= 0")]:
        with pytest.raises(UserError, match=re.escape(f"decode.{key}={value} {message}")):
            check_decode_config(DecodeConfig(**{key: value}))


def test_n_best_larger_than_the_beam_is_one_error() -> None:
    """The one check across decode keys, shared by the CLI, the API and the server's 422."""
    from transformer.config import DecodeConfig
    from transformer.decode.spec import check_decode_config

    with pytest.raises(UserError, match=re.escape("decode.n_best=3 is larger than beam_size=2")):
        check_decode_config(DecodeConfig(beam_size=2, n_best=3))
    check_decode_config(DecodeConfig(beam_size=1, n_best=3, sampling=True))  # samples are not a beam


def test_vocabulary_too_small_for_the_corpus_names_the_key() -> None:
    pairs = builtin_splits(200, 1, 1, 3)["train"]
    with pytest.raises(UserError, match=r"^data.vocab_size=10 is too small: BPE needs at least \d+ pieces"):
        build_tokenizer(pairs, vocab_size=10, joint=True, max_sentences=1000)


def test_corpus_of_one_huge_line_is_one_error() -> None:
    line = " ".join(["haus", "katze", "baum"] * 2000)  # ~30 KB on one line
    with pytest.raises(UserError, match=r"^no training sentence BPE can learn from: .* longest of 2 is 31,999 bytes"):
        build_tokenizer([(line, line)], vocab_size=100, joint=True, max_sentences=1000)


# the command line, for the same mistakes -----------------------------------------------


@pytest.mark.slow
def test_cli_zero_log_every_is_one_line(cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = cli(
        "train", "experiment=tiny", "trainer.log_every=0", f"run_dir={run}", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert_one_error_line(result, "trainer.log_every=0 must be >= 1")


@pytest.mark.slow
def test_cli_decode_without_checkpoint(cli, tmp_path: Path) -> None:
    assert_one_error_line(cli("decode", "sentence=one", cwd=tmp_path), "checkpoint must be given")


@pytest.mark.slow
def test_cli_export_onto_an_existing_file(cli, tiny_run: Path, tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_text("mine")
    result = cli("export", f"checkpoint={tiny_run}", "output=model.bin", cwd=tmp_path)
    assert_one_error_line(result, "output=model.bin: a file is there")
    assert (tmp_path / "model.bin").read_text() == "mine"


@pytest.mark.slow
def test_cli_serve_port_out_of_range(cli, tiny_run: Path, tmp_path: Path) -> None:
    assert_one_error_line(
        cli("serve", f"checkpoint={tiny_run}", "port=99999", cwd=tmp_path), "port=99999 must be in [1, 65535]"
    )


def test_serve_address_is_checked_before_any_model_loads() -> None:
    import socket

    from transformer.serve.server import check_address

    with pytest.raises(UserError, match=r"host='no\.such\.host\.invalid': cannot resolve it"):
        check_address("no.such.host.invalid", 8000)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"host='127.0.0.1' port={port}: cannot listen there"):
            check_address("127.0.0.1", port)
    check_address("127.0.0.1", port)  # free again: no error


@pytest.mark.slow
def test_cli_average_last_zero(cli, tiny_run: Path, tmp_path: Path) -> None:
    result = cli("average", f"inputs={tiny_run}", "output=avg.pt", "last=0", cwd=tmp_path)
    assert_one_error_line(result, "last=0 must be >= 1")
    assert not (tmp_path / "avg.pt").exists()
