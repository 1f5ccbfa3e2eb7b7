"""The run report of a finished run: curves.png and the README.md run card, whose
evaluate command must reproduce the test score training reported."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from transformer import Translator
from transformer.errors import UserError
from transformer.plots import MISSING_MATPLOTLIB
from transformer.report import hydra_value, write_run_report
from transformer.rundir import read_records
from transformer.sweep import summary_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["experiment=tiny"]


@pytest.fixture(scope="module")
def report_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shared tiny run (which is read-only) holding its report."""
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(tiny_run, run)
    from conftest import compose_config

    written = write_run_report(run, compose_config("train", [*TINY, f"run_dir={run}"]))
    assert written == {"curves": run / "curves.png", "card": run / "README.md"}
    return run


@pytest.fixture(scope="module")
def card(report_run: Path) -> str:
    return (report_run / "README.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_curves_png_is_written(report_run: Path) -> None:
    data = (report_run / "curves.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000


def test_metrics_split_into_training_and_validation(report_run: Path) -> None:
    train, valid = read_records(report_run)
    results = json.loads((report_run / "results.json").read_text(encoding="utf-8"))
    assert train and all({"step", "minutes", "loss"} <= set(r) for r in train)
    assert max(r["valid_bleu"] for r in valid) == results["best_valid_bleu"]
    assert [r["step"] for r in valid] == sorted(r["step"] for r in valid)


def test_card_holds_scores_signatures_model_and_data(report_run: Path, card: str) -> None:
    results = json.loads((report_run / "results.json").read_text(encoding="utf-8"))
    test = results["test"]
    assert f"best validation BLEU **{results['best_valid_bleu']:.2f}** at step {results['best_step']}" in card
    assert f"BLEU **{test['bleu']:.2f}**, chrF2 {test['chrf']:.2f}" in card
    assert test["bleu_signature"] in card and test["chrf_signature"] in card
    params = Translator.from_checkpoint(report_run, device="cpu").models[0].num_parameters()
    assert f"- {params:,} parameters" in card
    assert "generated pairs: 200 train, 20 valid, 20 test" in card  # configs/experiment/tiny.yaml
    assert "![training curves](curves.png)" in card
    assert "Resolved config:" in card  # trained from Python: no .hydra/overrides.yaml


@pytest.mark.slow
def test_card_evaluate_command_reproduces_the_test_score(report_run: Path, card: str, cli, tmp_path: Path) -> None:
    command = next(line for line in card.splitlines() if line.startswith("transformer-evaluate "))
    args = shlex.split(command)[1:]
    result = cli("evaluate", *args, "device=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    test = json.loads((report_run / "results.json").read_text(encoding="utf-8"))["test"]
    chrf = re.search(r"chrF2 = ([\d.]+)", result.stdout)
    assert chrf and float(chrf.group(1)) == test["chrf"]
    assert test["bleu_detail"] in result.stdout


def test_card_needs_a_config_outside_hydra(report_run: Path) -> None:
    with pytest.raises(UserError, match=r"no \.hydra/config\.yaml; pass the config"):
        write_run_report(report_run)


def test_without_matplotlib_the_card_is_still_written(
    report_run: Path, compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    run = tmp_path / "run"
    shutil.copytree(report_run, run, ignore=shutil.ignore_patterns("curves.png", "README.md", "checkpoints"))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    written = write_run_report(run, compose_cfg("train", TINY))
    assert set(written) == {"card"} and not (run / "curves.png").exists()
    assert MISSING_MATPLOTLIB in caplog.text
    assert "curves.png" not in written["card"].read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "value", ["/data/test.en.gz", "a b", "it's", "1234", "true", "null", "x=y,z", "", None, 12, 0.5, False]
)
def test_override_values_parse_back(value) -> None:
    parsed = OverridesParser.create().parse_override(f"data.key={hydra_value(value)}").value()
    assert parsed == value


def test_summary_table_marks_the_best_job_and_unfinished_ones() -> None:
    rows = [
        {
            "job": 0,
            "overrides": ["model.d_model=16"],
            "run_dir": "s/0",
            "results": {"best_valid_bleu": 10.0, "best_step": 5, "minutes": 1.0, "test": {"bleu": 9.5}},
        },
        {
            "job": 1,
            "overrides": ["model.d_model=32"],
            "run_dir": "s/1",
            "results": {"best_valid_bleu": 20.0, "best_step": 10, "minutes": 2.0},
        },
        {"job": 2, "overrides": ["model.d_model=64"], "run_dir": "s/2", "results": None},
    ]
    table = summary_table(rows).splitlines()
    assert len(table) == 2 + 3 + 2
    assert table[2].startswith("| 0 | model.d_model=16 | 10.00 | 5 | 9.50 |")
    assert "(no results.json)" in table[4]
    assert table[-1].startswith("best: job 1 (model.d_model=32), valid BLEU 20.00")
