"""The files of a training run directory, named once for their writers (training) and their
readers (report, sweeps, benchmarks).

``metrics.jsonl`` holds one JSON record per line, of two kinds: a training record
(``step``, ``epoch``, ``minutes`` and TRAIN_KEYS, optionally ``peak_mem_mb``) and a
validation record (``step``, ``minutes`` and VALID_KEYS). ``results.json`` holds the run's
final metrics; ``test.hyp.txt`` and ``test.hyp.json`` the test translations and scores.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from transformer.errors import UserError

METRICS = "metrics.jsonl"
RESULTS = "results.json"
TEST_HYPOTHESES = "test.hyp.txt"  # its scores: the same name with .json (evaluate.py writes both)
TEST_SCORES = "test.hyp.json"
TRAIN_KEYS = ("loss", "nll", "grad_norm", "lr", "tokens_per_s")
VALID_KEYS = ("valid_nll", "valid_ppl", "valid_bleu")
RESUME_CHANGES = "resume_changes"  # a metrics.jsonl record {step, resume_changes: {key: [old, new]}} (train/resume.py)
TEMPORARY = ".tmp"  # the suffix of a file being written by atomic_file (a kill may leave one behind)


def write_failed(path: Path, error: OSError) -> UserError:
    """One line for a write the system refused (disk full, read-only, no permission)."""
    return UserError(f"{path}: cannot write ({error.strerror or error}); files written before are kept")


@contextlib.contextmanager
def atomic_file(path: str | Path, text: bool = False) -> Iterator[IO]:
    """A file object whose contents replace ``path`` only once all of it is written: a
    temporary file in the same directory, fsynced, then renamed over ``path``. A crash leaves
    the old file or the new one, never half of one; a full disk or a read-only directory is
    one UserError naming ``path``, with the old file untouched."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY, dir=path.parent)
        umask = os.umask(0o022)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the usual mode of a new file
        with os.fdopen(fd, "w" if text else "wb", **({"encoding": "utf-8"} if text else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_failed(path, e) from None
        raise


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through atomic_file."""
    with atomic_file(path, text=isinstance(data, str)) as f:
        f.write(data)


def remove_temporary_files(*directories: Path) -> list[Path]:
    """Delete what atomic_file left behind when a run was killed mid-write (``.NAME.*.tmp``);
    returns the files removed. Call only while holding the run's lock."""
    found = [p for d in directories if d.is_dir() for p in d.glob(f".*{TEMPORARY}") if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def append_record(run_dir: str | Path, record: dict) -> None:
    path = Path(run_dir) / METRICS
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise write_failed(path, e) from None


def read_records(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """Training records and validation records of ``<run>/metrics.jsonl``."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise UserError(f"{path}: not found (is {run_dir} a training run directory?)")
    records = records_of(path)
    return [r for r in records if "loss" in r], [r for r in records if "valid_bleu" in r]


def read_resume_changes(run_dir: str | Path) -> list[dict]:
    """The resume_changes records of ``<run>/metrics.jsonl`` (settings a resume was allowed to change)."""
    path = Path(run_dir) / METRICS
    return [r for r in records_of(path) if RESUME_CHANGES in r] if path.is_file() else []


def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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
    atomic_write(path, "".join(kept))  # a kill at this moment leaves the old file whole


def write_results(run_dir: str | Path, metrics: dict) -> None:
    atomic_write(Path(run_dir) / RESULTS, json.dumps(metrics, indent=2) + "\n")


def read_results(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        raise UserError(f"{run_dir}: no {RESULTS} (has training finished?)")
    return json.loads(path.read_text(encoding="utf-8"))
