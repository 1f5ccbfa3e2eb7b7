"""Metric loggers (trainer.loggers): a logger registered from outside the package receives
every record metrics.jsonl holds, across a resume; one found by entry point; an unknown name
is one error line before any work; the console, TensorBoard naming; W&B offline and MLflow's
local file store read back equal to the records."""

from __future__ import annotations

import json
import logging
import re
import struct
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import compose_config
from transformer.config import TrainerConfig
from transformer.errors import UserError
from transformer.rundir import METRICS
from transformer.train import loggers, loop
from transformer.train.loggers import (
    LOGGERS,
    ConsoleLogger,
    MetricLogger,
    RunInfo,
    logger_class,
    logger_classes,
    register_logger,
)
from transformer.train.loggers import scalars as plotted
from transformer.train.runlog import RunLog

STEPS = ["trainer.max_steps=4", "trainer.eval_every=2", "trainer.log_every=1", "trainer.progress=false"]


def tiny(run_dir: Path, *overrides: str):
    return compose_config("train", ["experiment=tiny", "evaluate_test=false", f"run_dir={run_dir}", *overrides])


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS).read_text(encoding="utf-8").splitlines()]


class Recorder(MetricLogger):
    """Everything a run hands its loggers, in order (class-level: the trainer builds the instance)."""

    calls: list[tuple] = []

    def __init__(self, run: RunInfo):
        Recorder.calls.append(("init", run.resumed_at, run.total_steps, run.config["trainer"]["max_steps"]))

    def log(self, group: str, record: dict[str, Any], step: int) -> None:
        assert step == record["step"]
        Recorder.calls.append(("log", group, json.loads(json.dumps(record))))

    def text(self, tag: str, text: str, step: int) -> None:
        Recorder.calls.append(("text", tag, step))

    def advance(self) -> None:
        Recorder.calls.append(("advance",))

    def close(self) -> None:
        Recorder.calls.append(("close",))


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> type[Recorder]:
    monkeypatch.setattr(loggers, "LOGGERS", dict(LOGGERS))  # the registry as it was, after the test
    register_logger("recorder", Recorder)
    Recorder.calls = []
    return Recorder


def test_a_logger_registered_outside_receives_every_record(tmp_path: Path, recorder: type[Recorder]) -> None:
    run = tmp_path / "run"
    loop.train(tiny(run, *STEPS, "trainer.loggers=[jsonl,recorder]"))
    first = [call[2] for call in recorder.calls if call[0] == "log"]
    assert first == lines(run) and {r.get("valid_bleu") is not None for r in first} == {True, False}
    assert recorder.calls[0] == ("init", None, 4, 4) and recorder.calls[-1] == ("close",)
    assert [c for c in recorder.calls if c[0] == "advance"] == [("advance",)] * 4
    assert [c for c in recorder.calls if c[0] == "text"] == [
        ("text", "valid/translations", 2),
        ("text", "valid/translations", 4),
    ]

    recorder.calls = []  # a resume with an allowed change: its record goes to the loggers too
    allow = ["trainer.max_steps=6", "trainer.lr=0.002", "trainer.resume_allow=[trainer.lr,trainer.max_steps]"]
    loop.train(tiny(run, *STEPS[1:], *allow, f"trainer.resume={run}", "trainer.loggers=[recorder,jsonl]"))
    resumed = [call[2] for call in recorder.calls if call[0] == "log"]
    assert lines(run) == first + resumed
    assert resumed[0] == {"step": 4, "resume_changes": {"trainer.max_steps": [4, 6], "trainer.lr": [0.001, 0.002]}}
    assert [r["step"] for r in resumed if "loss" in r] == [5, 6] and recorder.calls[0] == ("init", 4, 6, 6)


def test_only_rank_0_builds_loggers(tmp_path: Path, recorder: type[Recorder]) -> None:
    other_rank = RunLog([Recorder], RunInfo(tmp_path, config={"trainer": {"max_steps": 1}}), enabled=False)
    other_rank.log("train", {"step": 1, "loss": 1.0}, "text")
    other_rank.advance()
    other_rank.close()
    assert recorder.calls == []


def test_a_logger_from_an_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package declaring ``[transformer.loggers] csv = my_loggers:CsvLogger`` is found by name."""
    (tmp_path / "my_loggers.py").write_text(
        textwrap.dedent(
            """
            from transformer.train.loggers import MetricLogger

            class CsvLogger(MetricLogger):
                def __init__(self, run):
                    self.path = run.run_dir / "metrics.csv"

                def log(self, group, record, step):
                    with open(self.path, "a") as f:
                        f.write(",".join(f"{k}={v}" for k, v in record.items()) + "\\n")
            """
        )
    )
    info = tmp_path / "my_loggers-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-loggers\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[transformer.loggers]\ncsv = my_loggers:CsvLogger\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = logger_class("csv")
    assert cls.__name__ == "CsvLogger" and issubclass(cls, MetricLogger)
    logger = cls(RunInfo(tmp_path))
    logger.log("train", {"step": 3, "loss": 1.5}, 3)
    logger.close()
    assert (tmp_path / "metrics.csv").read_text() == "step=3,loss=1.5\n"
    with pytest.raises(UserError, match="known: .*csv"):
        logger_class("cvs")


@pytest.mark.slow
def test_an_unknown_logger_is_one_error_before_any_work(tmp_path: Path, cli) -> None:
    with pytest.raises(UserError, match=r"^trainer.loggers: no logger named 'tensorbord'; known: .*tensorboard"):
        loop.train(tiny(tmp_path / "run", *STEPS, "trainer.loggers=[jsonl,tensorbord]"))
    assert not (tmp_path / "run" / METRICS).exists() and not (tmp_path / "run" / "spm.model").exists()
    done = cli("train", "experiment=tiny", f"run_dir={tmp_path / 'cli'}", "trainer.loggers=[wandbb]", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: trainer.loggers: no logger named 'wandbb'")
    assert not (tmp_path / "cli" / "spm.model").exists()


def test_a_missing_client_library_and_a_repeated_name_are_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    class Needy(MetricLogger):
        requires = ("no_such_client_library",)

        def log(self, group: str, record: dict[str, Any], step: int) -> None: ...

    monkeypatch.setitem(LOGGERS, "needy", Needy)
    with pytest.raises(UserError, match=r"^trainer.loggers: needy needs the no_such_client_library package"):
        logger_class("needy")
    monkeypatch.setattr(loggers, "find_spec", lambda module: None)  # as if the extra were not installed
    with pytest.raises(
        UserError, match=re.escape("mlflow needs the mlflow package (pip install 'transformer[mlflow]')")
    ):
        logger_class("mlflow")
    with pytest.raises(UserError, match="named twice"):
        logger_classes(["jsonl", "jsonl"])
    with pytest.raises(TypeError):
        register_logger("bad", dict)  # type: ignore[arg-type]


def test_the_default_is_todays_outputs() -> None:
    assert TrainerConfig().loggers == ["jsonl", "tensorboard", "console"]
    assert list(compose_config("train", ["experiment=tiny"]).trainer.loggers) == ["jsonl", "tensorboard", "console"]


def test_scalars_are_plotted_by_group() -> None:
    record = {"step": 2, "minutes": 0.1, "valid_bleu": 3.5, "valid_bleu_en-de": 4.0, "flag": True, "changes": {"a": 1}}
    assert plotted("valid", record) == {"valid/bleu": 3.5, "valid/bleu_en-de": 4.0}


def test_console_log_line_and_bar(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    record = {"step": 3, "epoch": 0, "minutes": 0.1, "loss": 2.5, "nll": 2.25, "grad_norm": 1.5, "lr": 1e-4}
    record["tokens_per_s"] = 1234.0
    line = ConsoleLogger(RunInfo(tmp_path, bar=False))
    with caplog.at_level(logging.INFO, logger="transformer.train.loggers"):
        line.log("train", record, 3)
        line.log("valid", {"step": 3, "valid_bleu": 1.0}, 3)  # validation has its own log line (validation.py)
    assert caplog.messages == ["step 3 loss 2.5000 nll 2.2500 lr 1.00e-04 gnorm 1.50 1234 tok/s"]
    bar = ConsoleLogger(RunInfo(tmp_path, resumed_at=2, total_steps=10, bar=True))
    bar.advance()
    bar.replan(20)
    assert (bar.bar.n, bar.bar.total) == (3, 20)
    bar.log("train", record, 3)
    assert bar.bar.postfix == "loss=2.500, lr=1.00e-04, tok_s=1234"  # tqdm sorts the keys
    bar.close()


# the trackers, offline --------------------------------------------------------------------

RECORDS = [
    ("train", {"step": 1, "epoch": 0, "minutes": 0.01, "loss": 2.5, "lr": 1e-4}),
    ("train", {"step": 2, "epoch": 0, "minutes": 0.02, "loss": 2.0, "lr": 2e-4}),
    ("valid", {"step": 2, "minutes": 0.03, "valid_nll": 1.5, "valid_bleu": 3.25}),
]


def feed(logger: MetricLogger, records: list[tuple[str, dict]]) -> None:
    for group, record in records:
        logger.log(group, record, record["step"])
    logger.text("valid/translations", "src: a\nhyp: <b>", 2)
    logger.close()


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, buf, rows = path.read_bytes(), 32768, 7, b"", []  # 7: the ":W&B" header
    while pos + 7 <= len(data):
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if block - pos % block < 7 or (length, kind) == (0, 0):  # a block's zero-filled tail
            pos += block - pos % block
            continue
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
            buf = b""
    return rows


@pytest.mark.slow
def test_wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    feed(logger_class("wandb")(RunInfo(run, config={"trainer": {"lr": 1e-4}})), RECORDS)
    (file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 30  # finish() returns before W&B's service has written the file out
    while len(rows := wandb_history(file)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [{k: v for k, v in row.items() if k.startswith(("train/", "valid/"))} for row in rows] == [
        {"train/loss": 2.5, "train/lr": 1e-4},
        {"train/loss": 2.0, "train/lr": 2e-4, "valid/nll": 1.5, "valid/bleu": 3.25}
        | {k: rows[1][k] for k in rows[1] if k.startswith("valid/translations")},
    ]
    assert [row["_step"] for row in rows] == [1, 2] and rows[1]["valid/translations/_type"] == "html-file"
    first = (run / "wandb.id").read_text().strip()
    assert file.name == f"run-{first}.wandb"
    resumed = logger_class("wandb")(RunInfo(run, resumed_at=2))
    resumed.close()
    assert resumed.run.id == first  # a resumed run continues the same W&B run


def test_mlflow_local_file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store in maintenance mode
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tiny")
    run = tmp_path / "run"
    run.mkdir()
    feed(logger_class("mlflow")(RunInfo(run, config={"trainer": {"lr": 1e-4, "betas": [0.9, 0.98]}})), RECORDS)
    client, run_id = MlflowClient(), (run / "mlflow.id").read_text().strip()
    found = client.get_run(run_id)
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert found.data.params == {"trainer.lr": "0.0001", "trainer.betas": "[0.9, 0.98]"}
    assert client.get_experiment(found.info.experiment_id).name == "tiny"
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in found.data.metrics}
    assert history == {
        "train/loss": [(1, 2.5), (2, 2.0)],
        "train/lr": [(1, 1e-4), (2, 2e-4)],
        "valid/nll": [(2, 1.5)],
        "valid/bleu": [(2, 3.25)],
    }
    text = Path(client.download_artifacts(run_id, "valid/translations/step_00000002.txt", str(tmp_path)))
    assert text.read_text() == "src: a\nhyp: <b>"
    feed(logger_class("mlflow")(RunInfo(run, resumed_at=2)), [("train", {"step": 3, "loss": 1.0})])
    assert (run / "mlflow.id").read_text().strip() == run_id  # the resumed run continues the same MLflow run
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")][-1] == (3, 1.0)


def test_no_loggers_no_metric_files_and_the_card_without_curves(tmp_path: Path) -> None:
    from transformer.report import write_run_report

    run = tmp_path / "run"
    cfg = tiny(run, *STEPS, "trainer.loggers=[]")
    metrics = loop.train(cfg)
    assert metrics["step"] == 4 and (run / "checkpoints" / "best.pt").is_file()
    assert not (run / METRICS).exists() and not (run / "tb").exists()
    assert set(write_run_report(run, cfg, metrics)) == {"card"}  # no curves.png without metrics.jsonl
