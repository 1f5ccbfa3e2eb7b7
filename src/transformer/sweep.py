"""A Hydra multirun's summary: one table row per job with its best validation BLEU and test
BLEU, written to ``<sweep dir>/summary.md`` by ``MultirunSummary``, the callback that
``configs/train.yaml`` registers for ``transformer-train -m ...``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from transformer.report import minutes_text
from transformer.rundir import RESULTS, atomic_write


def sweep_rows(sweep_dir: str | Path) -> list[dict]:
    """One row per job of a multirun: its number, the overrides that tell it apart from the
    other jobs, its run directory and (once finished) its results."""
    sweep = Path(sweep_dir)
    jobs = []
    for hydra_dir in sweep.glob("**/.hydra"):
        num = OmegaConf.load(hydra_dir / "hydra.yaml").hydra.job.num
        overrides = OmegaConf.to_container(OmegaConf.load(hydra_dir / "overrides.yaml"))
        results = hydra_dir.parent / RESULTS
        jobs.append(
            {
                "job": num,
                "overrides": overrides,
                "run_dir": str(hydra_dir.parent),
                "results": json.loads(results.read_text(encoding="utf-8")) if results.is_file() else None,
            }
        )
    common = set.intersection(*(set(j["overrides"]) for j in jobs)) if jobs else set()
    for j in jobs:
        j["overrides"] = [o for o in j["overrides"] if o not in common]
    return sorted(jobs, key=lambda j: j["job"])


def summary_table(rows: list[dict]) -> str:
    """A Markdown table of the jobs with their best validation BLEU and test BLEU."""
    lines = [
        "| job | overrides | best valid BLEU | at step | test BLEU | wall time | run dir |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row["results"]
        if r is None:
            cells = ["(no results.json)", "", "", ""]
        else:
            test = r.get("test", {}).get("bleu")
            cells = [
                f"{r['best_valid_bleu']:.2f}",
                str(r["best_step"]),
                "" if test is None else f"{test:.2f}",
                minutes_text(r["minutes"]),
            ]
        lines.append(
            f"| {row['job']} | {' '.join(row['overrides']) or '(none)'} | "
            + " | ".join(cells)
            + f" | {row['run_dir']} |"
        )
    finished = [row for row in rows if row["results"] is not None]
    if finished:
        best = max(finished, key=lambda row: row["results"]["best_valid_bleu"])
        lines += [
            "",
            f"best: job {best['job']} ({' '.join(best['overrides']) or 'no overrides'}), valid BLEU {best['results']['best_valid_bleu']:.2f}, {best['run_dir']}",
        ]
    return "\n".join(lines)


def write_sweep_summary(sweep_dir: str | Path) -> str:
    """Write ``summary.md`` and ``summary.json`` into the sweep directory; returns the table."""
    rows = sweep_rows(sweep_dir)
    table = summary_table(rows)
    atomic_write(Path(sweep_dir, "summary.md"), table + "\n")
    atomic_write(Path(sweep_dir, "summary.json"), json.dumps(rows, indent=2) + "\n")
    return table


class MultirunSummary(Callback):
    """Hydra callback: after the last job of ``transformer-train -m``, print and save the
    sweep's summary table (``<sweep dir>/summary.md``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        print(f"\nsweep {sweep_dir}:\n{write_sweep_summary(sweep_dir)}", flush=True)
