"""Soak: does training keep its speed and its memory over a long run?

Runs ``transformer-train`` (the Multi30k recipe by default) for ``--minutes`` without
evaluations, samples the process's resident memory every few seconds, and prints, per
window of minutes, target tokens/s (from metrics.jsonl) and RSS. Each ``--variant`` (a
label and overrides or environment, e.g. ``nokeep:trainer.keep_freed_memory=false``) runs
after the default, one at a time, so the table compares them on the same machine and day.
Targets (issue 22): tokens/s of the last 10 minutes within 10% of minutes 2-10; peak RSS
under 2.5 GB for the 2.9M-parameter recipe. On a VM the hypervisor may take CPU time from the
guest ("steal", /proc/stat); the table gives its share per window and the speed ratio per
unstolen CPU second, so a neighbour's load is not read as a slowdown of training.

    python scripts/bench_soak.py --minutes 60
    python scripts/bench_soak.py --minutes 15 --variant nokeep:trainer.keep_freed_memory=false
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from transformer.errors import UserError
from transformer.hardware import detect

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, in MB (0 once it has gone)."""
    total = 0.0
    for proc in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{proc}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


class Sample(NamedTuple):
    """One look at the training process and the machine."""

    minute: float  # since the process started
    rss: float  # MB, the process and its children
    stolen: int  # the machine's CPU time taken by the hypervisor so far (jiffies)
    total: int  # the machine's CPU time so far (jiffies)


def cpu_jiffies() -> tuple[int, int]:
    """(stolen, total) CPU time of the whole machine so far, from /proc/stat ((0, 0) off Linux)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_share(samples: list[Sample], lo: float, hi: float) -> float:
    """Share of the machine's CPU time the hypervisor took between the first and the last
    sample whose minute lies in [lo, hi); 0 when unknown."""
    inside = [s for s in samples if lo <= s.minute < hi]
    if len(inside) < 2 or inside[-1].total <= inside[0].total:
        return 0.0
    return (inside[-1].stolen - inside[0].stolen) / (inside[-1].total - inside[0].total)


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run_one(label: str, extra: list[str], args: argparse.Namespace, workdir: Path) -> dict:
    """One training process for --minutes; returns its samples and train records."""
    run_dir = workdir / label
    env = dict(os.environ)
    overrides = []
    for item in extra:
        key, _, value = item.partition("=")
        if key.isupper():  # an environment variable, e.g. LD_PRELOAD=...
            env[key] = value
        else:
            overrides.append(item)
    cmd = [
        str(Path(sys.executable).parent / "transformer-train"),
        f"experiment={args.experiment}",
        f"run_dir={run_dir}",
        f"hydra.run.dir={run_dir}",
        f"trainer.max_minutes={args.minutes}",
        "trainer.max_steps=10000000",
        "trainer.eval_every=10000000",
        "trainer.save_every=0",
        "trainer.log_every=50",
        "trainer.progress=false",
        "evaluate_test=false",
        *args.overrides,
        *overrides,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples, start = [], time.time()
    while proc.poll() is None and time.time() - start < args.minutes * 60 + 600:
        samples.append(Sample((time.time() - start) / 60, rss_mb(proc.pid), *cpu_jiffies()))
        time.sleep(5)
    if proc.poll() is None:
        proc.kill()
    err = proc.stderr.read() if proc.stderr else ""
    if proc.wait() != 0:
        raise UserError(f"{label}: training failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return {"label": label, "samples": samples, "train": [r for r in records if "tokens_per_s" in r]}


def window_speed(records: list[dict], lo: float, hi: float) -> float:
    """Mean target tokens/s of the log records whose minute lies in [lo, hi)."""
    speeds = [r["tokens_per_s"] for r in records if lo <= r["minutes"] < hi and r["step"] > 1]
    return sum(speeds) / len(speeds) if speeds else float("nan")


def report(results: list[dict], minutes: float, window: float) -> None:
    print(f"\nSoak, {minutes:g} min per run, on {detect().describe()}\n")
    edges = [i * window for i in range(int(minutes // window) + 1)]
    head = " | ".join(f"{lo:g}-{hi:g} min" for lo, hi in zip(edges, edges[1:]))
    print(
        f"| run | {head} | early (2-10) | last 10 | last/early | steal early/last | per CPU | peak RSS MB | targets |"
    )
    print("|---|" + "---:|" * (len(edges) + 6))
    for r in results:
        cells = []
        for lo, hi in zip(edges, edges[1:]):
            rss = max((s.rss for s in r["samples"] if lo <= s.minute < hi), default=0)
            steal = steal_share(r["samples"], lo, hi)
            cells.append(f"{window_speed(r['train'], lo, hi):.0f} tok/s, {rss:.0f} MB, steal {steal:.0%}")
        late = max(minutes - 10, 2)
        early, last = window_speed(r["train"], 2, 10), window_speed(r["train"], late, minutes + 1)
        steal_early, steal_last = steal_share(r["samples"], 2, 10), steal_share(r["samples"], late, minutes + 1)
        per_cpu = (last / (1 - steal_last)) / (early / (1 - steal_early))
        peak = max((s.rss for s in r["samples"]), default=0)
        ok = "met" if last / early >= 0.9 and peak < 2500 else "missed"
        print(
            f"| {r['label']} | {' | '.join(cells)} | {early:.0f} | {last:.0f} | {last / early:.2f} "
            f"| {steal_early:.0%} / {steal_last:.0%} | {per_cpu:.2f} | {peak:.0f} | {ok} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--window", type=float, default=10, help="minutes per table column")
    parser.add_argument("--experiment", default="multi30k_en_de")
    parser.add_argument("--overrides", nargs="*", default=[], help="for every run, e.g. trainer.precision=fp32")
    parser.add_argument(
        "--variant", action="append", default=[], help="LABEL:KEY=VALUE[,KEY=VALUE...] run after the default"
    )
    parser.add_argument("--skip-default", action="store_true")
    args = parser.parse_args()
    runs = [] if args.skip_default else [("default", [])]
    for v in args.variant:
        label, _, items = v.partition(":")
        runs.append((label, [i for i in items.split(",") if i]))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            report([run_one(label, extra, args, Path(tmp)) for label, extra in runs], args.minutes, args.window)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
