"""The files of a training run directory, named once for their writers (training) and their
readers (report, sweeps, benchmarks).

``metrics.jsonl`` holds one JSON record per line, of two kinds: a training record
(``step``, ``epoch``, ``minutes`` and TRAIN_KEYS, optionally ``peak_mem_mb``) and a
validation record (``step``, ``minutes`` and VALID_KEYS). ``results.json`` holds the run's
final metrics; ``test.hyp.txt`` and ``test.hyp.json`` the test translations and scores.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformer.errors import UserError

METRICS = "metrics.jsonl"
RESULTS = "results.json"
TEST_HYPOTHESES = "test.hyp.txt"  # its scores: the same name with .json (evaluate.py writes both)
TEST_SCORES = "test.hyp.json"
TRAIN_KEYS = ("loss", "nll", "grad_norm", "lr", "tokens_per_s")
VALID_KEYS = ("valid_nll", "valid_ppl", "valid_bleu")


def append_record(run_dir: str | Path, record: dict) -> None:
    with open(Path(run_dir) / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_records(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """Training records and validation records of ``<run>/metrics.jsonl``."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise UserError(f"{path}: not found (is {run_dir} a training run directory?)")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "valid_bleu" in r]


def truncate_records(run_dir: str | Path, step: int) -> None:
    """Drop records written after ``step`` (a resumed run starts there) and a line cut short by a kill."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            if line.endswith("\n") and json.loads(line)["step"] <= step:
                kept.append(line)
        except json.JSONDecodeError:
            pass
    path.write_text("".join(kept), encoding="utf-8")


def write_results(run_dir: str | Path, metrics: dict) -> None:
    (Path(run_dir) / RESULTS).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


def read_results(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        raise UserError(f"{run_dir}: no {RESULTS} (has training finished?)")
    return json.loads(path.read_text(encoding="utf-8"))
