"""Guarded runs: one training at a time in a run directory (a lock naming its holder, a dead
holder's lock taken over), resume refuses settings that break exactness unless allowed,
run files written atomically, and a refused write (disk full, read-only) is one error line
with nothing earlier lost. Every run is the tiny experiment."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import compose_config
from training import ENV, last_step, train_command
from transformer.checkpoint import load_checkpoint
from transformer.data.builtin import builtin_splits
from transformer.data.tokenizer import build_tokenizer
from transformer.errors import UserError
from transformer.report import write_run_report
from transformer.rundir import METRICS, atomic_write, truncate_records
from transformer.train import loop
from transformer.train.runlock import LOCK, hold_run_dir

STEPS = ["trainer.max_steps=4", "trainer.eval_every=2", "trainer.log_every=1"]


def tiny(run_dir: Path, *overrides: str):
    return compose_config("train", ["experiment=tiny", "evaluate_test=false", f"run_dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run (read-only for the tests: copy it to resume)."""
    run = tmp_path_factory.mktemp("four") / "run"
    loop.train(tiny(run, *STEPS))
    return run


def copy_run(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to)
    return to


# the lock ------------------------------------------------------------------------------


def test_a_held_run_directory_refuses_a_second_holder(tmp_path: Path) -> None:
    with hold_run_dir(tmp_path):
        holder = json.loads((tmp_path / LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        message = rf"^{re.escape(str(tmp_path))}: a training run is still writing here \(pid {os.getpid()} on "
        with pytest.raises(UserError, match=message):
            with hold_run_dir(tmp_path):
                pass
    assert not (tmp_path / LOCK).exists()  # released and removed
    with hold_run_dir(tmp_path):  # free again
        pass


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / LOCK).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "2026-01-01 00:00:00"}))
    leftover = tmp_path / "checkpoints" / ".last.pt.x1y2.tmp"  # what a kill inside atomic_save leaves
    leftover.parent.mkdir()
    leftover.write_bytes(b"PK half")
    with caplog.at_level(logging.INFO), hold_run_dir(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert "taking over the lock of pid 999999 on gone" in caplog.text
    assert not leftover.exists() and f"removed {leftover}" in caplog.text


@pytest.mark.slow
def test_two_trainings_into_one_run_directory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A second training, and a resume, into a directory whose run still trains are refused
    with one line naming the holder; once the holder is killed, the resume takes over."""
    run = tmp_path / "run"
    common = ["experiment=tiny", "evaluate_test=false", "trainer.log_every=1", "trainer.eval_every=100000"]
    common += ["trainer.save_every=2", "trainer.schedule=constant"]  # constant: max_steps may change on resume
    with open(tmp_path / "first.log", "w") as out:
        first = subprocess.Popen(
            train_command(run, *common, "trainer.max_steps=100000"), cwd=tmp_path, env=ENV, stdout=out, stderr=out
        )
    try:
        deadline = time.time() + 120
        while last_step(run) < 3 or not (run / "checkpoints/last.pt").exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            assert time.time() < deadline
            time.sleep(0.05)
        for extra in ([], [f"trainer.resume={run}"]):  # a second training; a resume while the first trains
            second = subprocess.run(
                train_command(run, *common, "trainer.max_steps=100000", *extra),
                cwd=tmp_path,
                env=ENV,
                capture_output=True,
                text=True,
            )
            assert second.returncode == 2, second.stderr[-2000:]
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
            assert lines[0].startswith(f"error: {run}: a training run is still writing here (pid {first.pid} on ")
        steps = [r["step"] for r in map(json.loads, (run / METRICS).read_text().splitlines()) if "loss" in r]
        assert steps == list(range(1, len(steps) + 1))  # one writer: no step twice
    finally:
        first.kill()
        first.wait()
    until = load_checkpoint(run / "checkpoints/last.pt")["progress"]["step"] + 1
    with caplog.at_level(logging.WARNING):  # the killed holder's flock is gone with it: its lock is taken over
        loop.train(
            compose_config("train", [*common, f"trainer.max_steps={until}", f"run_dir={run}", f"trainer.resume={run}"])
        )
    assert f"taking over the lock of pid {first.pid}" in caplog.text
    assert not (run / LOCK).exists()


# resume checks the settings ----------------------------------------------------------------

BREAKING = [
    ("trainer.lr=0.01", "trainer.lr: 0.001 -> 0.01"),
    ("data.max_tokens=256", "data.max_tokens: 512 -> 256"),
    ("trainer.seed=2", "trainer.seed: 1 -> 2"),
    ("trainer.schedule=constant", "trainer.schedule: cosine -> constant"),
    ("trainer.label_smoothing=0.2", "trainer.label_smoothing: 0.1 -> 0.2"),
    ("trainer.update_freq=2", "trainer.update_freq: 1 -> 2"),
    ("trainer.max_steps=8", "trainer.max_steps: 4 -> 8"),  # cosine: the schedule depends on it
    ("model.dropout=0.3", "model.dropout: 0.0 -> 0.3"),
    ("data.builtin_train=300", "data.builtin_train: 200 -> 300"),
    ("trainer.precision=fp32", "trainer.precision: auto -> fp32"),
    ("trainer.ema_decay=0.9", "trainer.ema_decay: 0.0 -> 0.9"),
    ("model.d_model=64", "model.d_model: 32 -> 64"),
]


@pytest.mark.slow
@pytest.mark.parametrize("override, change", BREAKING, ids=[o for o, _ in BREAKING])
def test_resume_refuses_a_change_that_breaks_exactness(four_steps: Path, override: str, change: str) -> None:
    with pytest.raises(UserError, match=re.escape(change)) as err:
        loop.train(tiny(four_steps, *STEPS, override, f"trainer.resume={four_steps}"))
    key = change.split(":")[0]
    assert f"trainer.resume_allow=[{key}]" in str(err.value)
    assert load_checkpoint(four_steps / "checkpoints/last.pt")["progress"]["step"] == 4  # nothing was touched


@pytest.mark.slow
def test_resume_accepts_allowed_and_free_changes_and_records_them(four_steps: Path, tmp_path: Path) -> None:
    run = copy_run(four_steps, tmp_path / "run")
    allow = "trainer.resume_allow=[trainer.lr,trainer.max_steps]"
    free = ["trainer.save_every=1", "trainer.threads=2", "trainer.keep_last=5"]  # no effect on the numbers
    metrics = loop.train(
        tiny(run, *STEPS[1:], *free, "trainer.max_steps=6", "trainer.lr=0.002", f"trainer.resume={run}", allow)
    )
    assert metrics["step"] == 6
    torch.set_num_threads(1)
    records = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    changed = [r for r in records if "resume_changes" in r]
    assert changed == [{"step": 4, "resume_changes": {"trainer.max_steps": [4, 6], "trainer.lr": [0.001, 0.002]}}]
    assert [r["lr"] for r in records if "loss" in r and r["step"] == 5] == [0.002]  # end of warmup: the new peak
    card = write_run_report(run, tiny(run, *STEPS), metrics)["card"].read_text()
    assert "- at step 4: `trainer.max_steps` 4 -> 6, `trainer.lr` 0.001 -> 0.002" in card


def test_resume_allow_names_only_existing_keys(four_steps: Path) -> None:
    with pytest.raises(UserError, match=r"^trainer.resume_allow: no setting named trainer.learning_rate"):
        loop.train(
            tiny(four_steps, *STEPS, f"trainer.resume={four_steps}", "trainer.resume_allow=[trainer.learning_rate]")
        )


def test_an_allowed_shape_change_names_the_key(four_steps: Path) -> None:
    allow = "trainer.resume_allow=[model.d_model]"
    with pytest.raises(UserError, match=r"weights do not fit the model of this run: model.d_model: 32 -> 64"):
        loop.train(tiny(four_steps, *STEPS, "model.d_model=64", f"trainer.resume={four_steps}", allow))


# atomic files, refused writes ------------------------------------------------------------------


def refuse(code: int, strerror: str):
    def raise_error(*args, **kwargs):
        raise OSError(code, strerror)

    return raise_error


def test_metrics_truncation_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / METRICS
    text = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo'
    path.write_text(text)
    monkeypatch.setattr(os, "replace", refuse(errno.EROFS, "Read-only file system"))  # a kill or refusal mid-way
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: cannot write \(Read-only file system\)"):
        truncate_records(tmp_path, 2)
    assert path.read_text() == text and [p.name for p in tmp_path.iterdir()] == [METRICS]  # untouched, no temp file
    monkeypatch.undo()
    truncate_records(tmp_path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_spm_model_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = build_tokenizer(builtin_splits(200, 1, 1, 3)["train"], vocab_size=120, joint=True, max_sentences=1000)
    atomic_write(tmp_path / "spm.model", b"the old model")
    monkeypatch.setattr(os, "fsync", refuse(errno.ENOSPC, "No space left on device"))
    with pytest.raises(UserError, match=r"spm.model: cannot write \(No space left on device\)"):
        tokenizer.save(tmp_path)
    assert (tmp_path / "spm.model").read_bytes() == b"the old model"
    assert [p.name for p in tmp_path.iterdir()] == ["spm.model"]


def test_disk_full_during_training_is_one_error_and_keeps_what_was_written(
    four_steps: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = copy_run(four_steps, tmp_path / "run")
    before = (run / "checkpoints/last.pt").read_bytes()
    records = (run / METRICS).read_text()
    monkeypatch.setattr(torch, "save", refuse(errno.ENOSPC, "No space left on device"))
    allow = "trainer.resume_allow=[trainer.max_steps]"
    with pytest.raises(
        UserError, match=r"checkpoints/last.pt: cannot write \(No space left on device\); files written"
    ):
        loop.train(tiny(run, *STEPS[1:], "trainer.max_steps=6", f"trainer.resume={run}", allow))
    assert (run / "checkpoints/last.pt").read_bytes() == before  # the last good checkpoint is whole
    assert (run / METRICS).read_text().startswith(records)  # the records written before are all there
    assert not list((run / "checkpoints").glob(".*.tmp")) and not (run / LOCK).exists()


def test_read_only_run_directory_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as root, where chmod does not stop writes: the refusal is injected."""
    run = tmp_path / "run"
    monkeypatch.setattr(os, "open", refuse(errno.EROFS, "Read-only file system"))
    with pytest.raises(UserError, match=rf"^{re.escape(str(run / LOCK))}: cannot write \(Read-only file system\)"):
        loop.train(tiny(run, *STEPS))


# what the logs and the card say --------------------------------------------------------------


def test_fine_tune_card_and_threads_describe_what_ran(
    four_steps: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformer.hardware import detect

    run = tmp_path / "tuned"
    torch.set_num_threads(2)
    detect.cache_clear()
    try:
        cfg = compose_config("train", ["experiment=tiny", "model=small", "evaluate_test=false", f"run_dir={run}"])
        cfg.trainer.init_from, cfg.trainer.max_steps = str(four_steps), 2
        with caplog.at_level(logging.INFO):
            metrics = loop.train(cfg)
    finally:
        torch.set_num_threads(1)
        detect.cache_clear()
    assert re.search(r"hardware: .*, 1 threads\)", caplog.text)  # trainer.threads=1 of the tiny experiment
    trained = re.search(r"model: ([\d,]+) parameters", caplog.text)[1]
    card = write_run_report(run, cfg, metrics)["card"].read_text()
    assert "d_model 32," in card and f"- {trained} parameters" in card  # the model trained, not model=small
