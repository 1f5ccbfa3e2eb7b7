"""A Hydra sweep (``transformer-train -m``): one run directory per job, each with its report,
and a summary table of the jobs at the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

pytestmark = pytest.mark.slow

WIDTHS = (16, 32)


@pytest.fixture(scope="module")
def sweep(cli, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Two tiny jobs that differ in model.d_model; returns the sweep dir and stdout."""
    workdir = tmp_path_factory.mktemp("sweep")
    sweep_dir = workdir / "sweep"
    result = cli(
        "train",
        "-m",
        "experiment=tiny",
        f"model.d_model={','.join(map(str, WIDTHS))}",
        f"hydra.sweep.dir={sweep_dir}",
        "trainer.max_steps=6",
        "trainer.eval_every=3",
        "trainer.device=cpu",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir, result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("job", range(len(WIDTHS)))
def test_each_job_has_its_own_run_directory(sweep: tuple[Path, str], job: int) -> None:
    run = sweep[0] / str(job)
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    assert Path(results["run_dir"]).resolve() == run.resolve()  # run_dir comes from each job's output dir
    assert OmegaConf.load(run / ".hydra" / "config.yaml").model.d_model == WIDTHS[job]
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "metrics.jsonl").is_file()
    assert (run / "curves.png").read_bytes().startswith(b"\x89PNG")
    card = (run / "README.md").read_text(encoding="utf-8")
    assert f"model.d_model={WIDTHS[job]}" in card  # the overrides section
    assert f"d_model {WIDTHS[job]}," in card


def test_summary_lists_every_job(sweep: tuple[Path, str]) -> None:
    sweep_dir, stdout = sweep
    table = (sweep_dir / "summary.md").read_text(encoding="utf-8")
    assert table.strip() in stdout
    rows = json.loads((sweep_dir / "summary.json").read_text(encoding="utf-8"))
    assert [r["job"] for r in rows] == list(range(len(WIDTHS)))
    for row, width in zip(rows, WIDTHS):
        assert row["overrides"] == [f"model.d_model={width}"]  # only what tells the jobs apart
        results = json.loads(Path(row["run_dir"], "results.json").read_text(encoding="utf-8"))
        assert row["results"]["best_valid_bleu"] == results["best_valid_bleu"]
        assert f"| {row['job']} | model.d_model={width} | {results['best_valid_bleu']:.2f} |" in table
