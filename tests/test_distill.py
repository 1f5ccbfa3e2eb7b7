"""transformer-distill: resumable chunked translation, a tiny teacher -> student run killed and
resumed in the translation stage, the synthetic-pair mixing, back-translation, and the
student's shape keys."""

from __future__ import annotations

import json
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import compose_config
from tiny import tiny_model
from transformer import distill
from transformer.checkpoint import resolve_checkpoint
from transformer.config import DataConfig, DistillConfig, Quantize, TrainConfig, typed
from transformer.data.builtin import builtin_splits
from transformer.data.corpus import read_tsv
from transformer.data.sources import load_train_pairs
from transformer.data.synthetic import with_synthetic
from transformer.data.tokenizer import Tokenizer
from transformer.decode.shortlist import load_shortlist
from transformer.decode.translator import Translator
from transformer.errors import UserError
from transformer.train import loop


class Killed(Exception):
    """Stands in for a kill between two chunks."""


def kill_after(monkeypatch: pytest.MonkeyPatch, chunks: int) -> None:
    """distill.write_chunk dies once ``chunks`` chunks are written (the next is lost)."""
    real, written = distill.write_chunk, [0]

    def write_chunk(path: Path, lines: list[str]) -> None:
        if written[0] == chunks:
            raise Killed(path.name)
        real(path, lines)
        written[0] += 1

    monkeypatch.setattr(distill, "write_chunk", write_chunk)


def test_chunks_killed_after_chunk_k_resume_without_a_lost_or_repeated_line(tmp_path: Path, monkeypatch) -> None:
    sentences = [f"sentence {i}" for i in range(23)]
    calls: list[list[str]] = []

    def translate(lines: list[str]) -> list[str]:
        calls.append(lines)
        return [line.upper() for line in lines]

    kill_after(monkeypatch, 2)
    with pytest.raises(Killed, match="000002.txt"):
        distill.translate_chunks(translate, sentences, tmp_path / "chunks", 5)
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == ["000000.txt", "000001.txt"]  # no partial file
    monkeypatch.undo()
    calls.clear()
    done = distill.translate_chunks(translate, sentences, tmp_path / "chunks", 5)
    assert done == [s.upper() for s in sentences]
    assert [lines[0] for lines in calls] == ["sentence 10", "sentence 15", "sentence 20"]  # only what was missing
    assert distill.translate_chunks(lambda lines: pytest.fail("all cached"), sentences, tmp_path / "chunks", 5) == done


def test_translation_budget_stops_after_a_chunk_and_a_damaged_chunk_is_named(tmp_path: Path, monkeypatch) -> None:
    now = [0.0]
    monkeypatch.setattr(distill.time, "monotonic", lambda: now[0])

    def slow(lines: list[str]) -> list[str]:
        now[0] += 40.0
        return lines

    sentences = [f"s{i}" for i in range(10)]
    assert distill.translate_chunks(slow, sentences, tmp_path / "c", 3, minutes=1.0) == sentences[:6]  # 2 chunks, 80 s
    (tmp_path / "c" / "000000.txt").write_text("only one line\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"000000.txt: 1 lines where 3 were translated \(delete the file to redo it\)"):
        distill.translate_chunks(slow, sentences, tmp_path / "c", 3)


def test_synthetic_pairs_mix_at_their_ratios_with_tagged_back_translations(tmp_path: Path) -> None:
    original = [(f"src {i}", f"ref {i}") for i in range(10)]
    teacher = tmp_path / "teacher.tsv"
    teacher.write_text("".join(f"src {i}\thyp {i}\n" for i in range(10)), encoding="utf-8")
    back = tmp_path / "bt.tsv"
    back.write_text("".join(f"synthetic {i}\tmono {i}\n" for i in range(30)), encoding="utf-8")
    cfg = DataConfig(distilled_file=str(teacher), original_ratio=0.5, bt_file=str(back), bt_ratio=2.0)
    mixed = with_synthetic(cfg, original)
    assert mixed[:10] == [(f"src {i}", f"hyp {i}") for i in range(10)]
    kept = mixed[10:15]
    assert len(kept) == 5 and set(kept) <= set(original) and kept == sorted(kept, key=original.index)
    tagged = mixed[15:]
    assert len(tagged) == 20 and all(s.startswith("<BT> synthetic ") and t.startswith("mono ") for s, t in tagged)
    assert with_synthetic(cfg, original) == mixed  # the same mix every time (a resumed run's)
    assert with_synthetic(DataConfig(distilled_file=str(teacher), original_ratio=0.0), original) == mixed[:10]
    with pytest.raises(UserError, match="data.original_ratio=-1.0 must be >= 0"):
        with_synthetic(DataConfig(distilled_file=str(teacher), original_ratio=-1.0), original)
    with pytest.raises(UserError, match="not data.streaming"):
        with_synthetic(DataConfig(bt_file=str(back), streaming=True, source="files"), original)


def quietly(task, *args):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return task(*args)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def distill_config(run: Path, teacher: Path, *overrides: str):
    return compose_config(
        "distill",
        [
            f"teacher={teacher}",
            "experiment=tiny",
            f"run_dir={run}",
            f"data.cache_dir={run.parent / 'cache'}",
            "distill.chunk_lines=64",
            "trainer.max_steps=10",
            *overrides,
        ],
    )


@pytest.mark.slow
def test_tiny_teacher_to_student_killed_in_translation_and_resumed(tiny_run: Path, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "distill"
    kill_after(monkeypatch, 1)
    with pytest.raises(Killed):
        quietly(distill.distill, distill_config(run, tiny_run))
    monkeypatch.undo()
    metrics = quietly(distill.distill, distill_config(run, tiny_run))

    cfg = typed(distill_config(run, tiny_run), TrainConfig)
    sources = [s for s, _ in load_train_pairs(cfg.data)]
    distilled = Path(json.loads((run / "student" / "results.json").read_text())["run_dir"])
    pairs_file = next((tmp_path / "cache" / "synthetic").glob("distill-*/pairs.tsv"))
    pairs = list(read_tsv(str(pairs_file)))
    teacher = Translator.from_checkpoint(tiny_run, device="cpu", config=cfg.decode)
    assert [s for s, _ in pairs] == sources  # every source once, in order
    assert [t for _, t in pairs] == [
        " ".join(t.split()) for t in teacher.translate(sources)
    ]  # as one uninterrupted run
    assert distilled == run / "student" and (run / "student" / "README.md").is_file()
    student_cfg = torch.load(run / "student/checkpoints/last.pt", weights_only=False)["config"]
    assert student_cfg["data"]["distilled_file"] == str(pairs_file) and student_cfg["model"]["n_decoder_layers"] == 1

    rows = json.loads((run / "distill.json").read_text())
    assert rows == metrics["distill"]
    assert list(rows) == ["teacher", "student", "student int8+shortlist"]  # the student as deployed too
    assert rows["student int8+shortlist"]["parameters"] == rows["student"]["parameters"]
    assert (run / "student" / "checkpoints" / "shortlist.pt").is_file()
    for name in rows:
        for search, beam in (("beam", cfg.decode.beam_size), ("greedy", 1)):
            r = rows[name][search]
            assert r["beam_size"] == beam and 0 <= r["bleu"] <= 100 and r["sentences_per_s"] > 0
    assert rows["teacher"]["parameters"] == sum(p.numel() for p in teacher.models[0].parameters())
    assert rows["student"]["beam"]["speedup"] > 0
    table = (run / "distill.md").read_text()
    assert "| teacher |" in table and "| student |" in table and "| student int8+shortlist |" in table
    assert "greedy 1" in table


def test_the_deploy_row_decodes_the_student_in_int8_with_its_shortlist_built_beside_it(
    tiny_run: Path, tmp_path: Path
) -> None:
    cfg = typed(distill_config(tmp_path / "distill", tiny_run), DistillConfig)
    student = tmp_path / "student.pt"
    shutil.copy(resolve_checkpoint(str(tiny_run)), student)
    name, decode = distill.deployed(cfg, student)
    assert (name, decode.quantize, decode.shortlist) == (
        "student int8+shortlist",
        Quantize.int8,
        str(tmp_path / "shortlist.pt"),
    )
    table = load_shortlist(
        tmp_path / "shortlist.pt", torch.load(student, weights_only=False)["model_config"]["tgt_vocab_size"]
    )
    assert table.bleu_loss is not None  # measured on the validation split
    assert replace(decode, quantize=cfg.decode.quantize, shortlist=cfg.decode.shortlist) == cfg.decode  # only those
    only_int8 = replace(cfg, distill=replace(cfg.distill, shortlist=False))
    assert distill.deployed(only_int8, student)[0] == "student int8"
    neither = replace(cfg, distill=replace(cfg.distill, shortlist=False, quantize=Quantize.none))
    assert distill.deployed(neither, student) is None


def test_back_translation_makes_tagged_pairs_the_tokenizer_keeps_whole(tiny_run: Path, tmp_path: Path) -> None:
    mono = tmp_path / "mono.de"
    targets = [t for _, t in builtin_splits(40, 10, 10, seed=99)["train"]]
    mono.write_text("\n".join(targets) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    overrides = [f"data.monolingual_tgt={mono}", f"data.reverse_model={tiny_run}", "data.bt_ratio=0.1"]
    cfg = typed(
        compose_config("train", ["experiment=tiny", f"run_dir={run}", "evaluate_test=false", *overrides]), TrainConfig
    )
    with_bt = quietly(distill.back_translated, cfg)
    pairs = list(read_tsv(with_bt.data.bt_file))
    assert [t for _, t in pairs] == targets and cfg.data.bt_file is None  # a new config, the given one untouched
    quietly(loop.train, with_bt)
    tokenizer = Tokenizer.load(run)
    pieces = tokenizer.src_pieces("<BT> a dog")
    assert "<BT>" in pieces[:2] and "<BT>" not in tokenizer.src_pieces("a <BT dog")  # one piece, never split
    tag = tokenizer.src.piece_to_id("<BT>")
    tagged = [e for e in loop.Trainer(with_bt).data.train_examples if tag in e.src]
    assert len(tagged) == round(0.1 * 200)  # data.bt_ratio of the 200 original pairs


def test_back_translation_needs_a_reverse_model(tmp_path: Path) -> None:
    cfg = TrainConfig(data=DataConfig(monolingual_tgt=str(tmp_path / "x.de")), run_dir=str(tmp_path))
    with pytest.raises(
        UserError, match=r"data.monolingual_tgt=.*x.de needs data.reverse_model=RUN_OR_PT: a model translating de -> en"
    ):
        distill.back_translated(cfg)


@pytest.mark.slow
def test_distill_command_names_a_missing_or_wrong_teacher(cli, tmp_path: Path) -> None:
    missing = cli("distill", "experiment=tiny", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith(
        "error: teacher must be given (teacher=...; see --help)"
    )
    wrong = cli("distill", "teacher=nowhere.pt", "experiment=tiny", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert wrong.returncode == 2 and "error: teacher=nowhere.pt: no checkpoint there" in wrong.stderr


def test_a_student_decoder_is_as_deep_and_wide_as_its_keys() -> None:
    model = tiny_model(n_encoder_layers=3, n_decoder_layers=1, decoder_d_ff=16)
    assert len(model.encoder) == 3 and len(model.decoder) == 1
    assert model.encoder[0].ffn.fc1.out_features == 64 and model.decoder[0].ffn.fc1.out_features == 16
    assert tiny_model().decoder[0].ffn.fc1.out_features == 64  # decoder_d_ff 0: as wide as d_ff
    vocab = model.cfg.src_vocab_size
    src, tgt = torch.randint(4, vocab, (2, 5)), torch.randint(4, vocab, (2, 4))
    assert model(src, tgt).shape == (2, 4, model.cfg.tgt_vocab_size)


def test_a_student_with_a_narrow_decoder_exports_to_the_same_logits(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from dataclasses import asdict

    from tiny import padded, random_sources, tiny_tokenizer
    from transformer.checkpoint import FORMAT, load_model
    from transformer.cli.export import main as export_main
    from transformer.cli.import_hf import main as import_main
    from transformer.vocab import BOS, EOS, PAD

    tokenizer = tiny_tokenizer()
    model = tiny_model(vocab=tokenizer.src_vocab_size, n_encoder_layers=3, n_decoder_layers=1, decoder_d_ff=16)
    checkpoint = tmp_path / "student.pt"
    state = {"model": model.state_dict(), "model_config": asdict(model.cfg), "tokenizer": tokenizer.to_state()}
    torch.save({"format": FORMAT, **state}, checkpoint)
    export_main([f"checkpoint={checkpoint}", f"output={tmp_path / 'hf'}"])
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert (hf.config.encoder_ffn_dim, hf.config.decoder_ffn_dim, hf.config.decoder_layers) == (64, 16, 1)
    src = padded(random_sources([6, 3, 8], vocab=tokenizer.src_vocab_size))
    tgt = torch.cat([torch.full((3, 1), BOS), torch.randint(EOS + 1, model.cfg.tgt_vocab_size, (3, 5))], dim=1)
    with torch.no_grad():
        theirs = hf(input_ids=src, attention_mask=(src != PAD).long(), decoder_input_ids=tgt).logits
        torch.testing.assert_close(theirs, model(src, tgt), atol=1e-4, rtol=0)
    import_main([f"hf={tmp_path / 'hf'}", f"output={tmp_path / 'back.pt'}"])  # and back again
    back, _, _ = load_model(tmp_path / "back.pt")
    assert back.cfg.decoder_d_ff == 16 and back.cfg.d_ff == 64
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(src, tgt), model(src, tgt), atol=1e-4, rtol=0)
