"""The one table of scripts/gpu_check.sh: its parts' JSON and metrics read back from OUT_DIR.

    python scripts/gpu_table.py runs/gpu_check

Rows: training (bench_train.py: ours, ours compiled, HF Marian), the WMT14 recipe's 200
updates (the trainer's own log lines), decoding beam N (bench_decode.py). A part that failed
or timed out shows as such, with its exit status from status.txt.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HEADER = "| part | system | precision | tokens/s | MFU (measured peak) | MFU (datasheet) | peak memory MiB | sentences/s | vs reference |"


def read_json(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def training_rows(out: Path) -> list[str]:
    """bench_train.py's rows, speed against HF Marian's at the same precision."""
    rows = read_json(out / "bench_train.json") + read_json(out / "bench_compiled.json")
    hf = {r["precision"]: r["tokens_per_s"] for r in rows if r["impl"] == "hf"}
    lines = []
    for r in rows:
        ratio = f"{r['tokens_per_s'] / hf[r['precision']]:.2f}x HF" if r["precision"] in hf else "-"
        lines.append(
            f"| train step | {r['impl']} | {r['precision']} | {r['tokens_per_s']:.0f} | {percent(r['mfu'])} | "
            f"{percent(r.get('mfu_datasheet'))} | {r['peak_mem_mb']:.0f} | - | {ratio} |"
        )
    return lines


def recipe_row(out: Path) -> list[str]:
    """The recipe run's tokens/s: the median of its log lines after the first (compilation)."""
    path = out / "wmt" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    train = [r for r in records if "tokens_per_s" in r]
    if not train:
        return []
    speeds = [r["tokens_per_s"] for r in train[1:]] or [train[0]["tokens_per_s"]]
    memory = max((r.get("peak_mem_mb") or 0) for r in train)  # CUDA only: none on a CPU
    steps, results = train[-1]["step"], out / "wmt" / "results.json"
    precision = json.loads(results.read_text()).get("precision", "?") if results.exists() else "?"
    return [
        f"| WMT14 recipe, {steps} updates | ours (trainer) | {precision} | {statistics.median(speeds):.0f} | - | - | "
        f"{f'{memory:.0f}' if memory else '-'} | - | - |"
    ]


def decoding_rows(out: Path) -> list[str]:
    """bench_decode.py's rows, sentences/s against CTranslate2's (else HF's) at the same beam."""
    rows = read_json(out / "bench_decode.json")
    lines = []
    for r in rows:
        peers = {p["system"]: p["sent_per_s"] for p in rows if p["beam"] == r["beam"]}
        name, ref = next(((n, peers[n]) for n in ("ct2-fp32", "hf") if n in peers), ("", 0.0))
        ratio = f"{r['sent_per_s'] / ref:.2f}x {name}" if ref else "-"
        memory = r.get("gpu_peak_mib")
        lines.append(
            f"| decode beam {r['beam']} | {r['system']} | {'bf16' if r['system'].endswith('-bf16') else 'fp32'} | "
            f"{r['tok_per_s']:.0f} | - | - | {'-' if memory is None else f'{memory:.0f}'} | {r['sent_per_s']:.1f} | {ratio} |"
        )
    return lines


def failures(out: Path) -> list[str]:
    """status.txt's parts that did not exit 0 (124: timed out)."""
    path = out / "status.txt"
    parts = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
    return [f"{name}: {'timed out' if rc == '124' else f'exit {rc}'}" for name, rc in parts if rc != "0"]


def table(out: Path) -> str:
    """The markdown table, headed by the GPU and torch lines gpu_check.sh saved."""
    head = [(out / f).read_text().strip() for f in ("gpu.txt", "torch.txt", "ct2.txt") if (out / f).exists()]
    lines = [*head, "", HEADER, "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += training_rows(out) + recipe_row(out) + decoding_rows(out)
    if bad := failures(out):
        lines += ["", "failed parts: " + "; ".join(bad)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu_check")))
