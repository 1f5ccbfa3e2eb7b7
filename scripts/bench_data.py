"""Start-up cost of large corpora (not a timed test): synthetic WMT-shaped parallel corpora of
100k, 1M and 4.5M pairs are written to /tmp (never into the repository), and for each size
``transformer-train`` (tiny model, data.cache on) is timed from launch to its first update:

- cold: a fresh run with an empty cache (BPE on the sample, encoding, then training);
- warm: a fresh run on the same corpus (BPE model and token arrays come from the cache);
- resume: ``trainer.resume`` of the cold run;
- nocache: today's in-memory path (data.cache=false), for sizes up to --nocache-max.

It prints peak RSS (VmHWM; anonymous and file-backed RSS at the first update), the cache's
size on disk, and encoding speed (pairs/s, from the run's log).

    .venv/bin/python scripts/bench_data.py --sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def lexicon(n: int, seed: int) -> list[str]:
    """``n`` distinct pseudo-words of 1-4 syllables (so BPE finds pieces, as in real text)."""
    rng = np.random.default_rng(seed)
    onsets, vowels, codas = (
        ["", "b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "w", "sch", "st", "tr"],
        list("aeiou") + ["ei", "au"],
        ["", "", "n", "r", "s", "t", "ng"],
    )
    syllables = [o + v + c for o in onsets for v in vowels for c in codas]
    words: dict[str, None] = {}
    while len(words) < n:
        for k in rng.integers(1, 5, n).tolist():
            words["".join(syllables[i] for i in rng.integers(0, len(syllables), k).tolist())] = None
    return list(words)[:n]


def sentences(words: list[str], lengths: np.ndarray, rng: np.random.Generator) -> str:
    """Newline-terminated sentences of Zipf-distributed words, ``lengths`` words each."""
    ids = (rng.zipf(1.15, int(lengths.sum())) - 1) % len(words)
    tokens = [words[i] for i in ids.tolist()]
    seps = np.full(len(tokens), " ", dtype=object)
    seps[np.cumsum(lengths) - 1] = "\n"
    return "".join(itertools.chain.from_iterable(zip(tokens, seps.tolist())))


def write_corpus(directory: Path, n_train: int, n_eval: int = 200, seed: int = 0) -> dict[str, str]:
    """WMT-shaped text pairs: source lengths lognormal (mean ~24 words, long tail, 1-200),
    target ~1.1x the source; ``train``, ``valid`` and ``test`` splits; returns data overrides."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    src_words, tgt_words = lexicon(30_000, seed), lexicon(40_000, seed + 1)
    overrides = {}
    for split, n in (("train", n_train), ("valid", n_eval), ("test", n_eval)):
        paths = {side: directory / f"{split}.{side}" for side in ("en", "de")}
        with open(paths["en"], "w", encoding="utf-8") as en, open(paths["de"], "w", encoding="utf-8") as de:
            for start in range(0, n, 200_000):
                k = min(200_000, n - start)
                src_len = np.clip(rng.lognormal(3.0, 0.55, k).round(), 1, 200).astype(np.int64)
                tgt_len = np.clip((src_len * rng.normal(1.1, 0.15, k)).round(), 1, 220).astype(np.int64)
                en.write(sentences(src_words, src_len, rng))
                de.write(sentences(tgt_words, tgt_len, rng))
        overrides[f"data.{split}_src"], overrides[f"data.{split}_tgt"] = str(paths["en"]), str(paths["de"])
    return overrides


def memory(pid: int) -> dict[str, int]:
    """VmHWM, RssAnon and RssFile of a process, in MiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) // 1024
    return fields


def first_update(run_dir: Path, name: str, args: list[str], want_step: int) -> dict:
    """Launch transformer-train (log in ``<run_dir>.<name>.log``); seconds until metrics.jsonl
    shows ``want_step``, memory then, and the peak."""
    script = Path(sys.executable).parent / "transformer-train"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    log = open(run_dir.with_suffix(f".{name}.log"), "w")
    start = time.time()
    proc = subprocess.Popen(
        [str(script), *args, f"run_dir={run_dir}", f"hydra.run.dir={run_dir}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    metrics, seconds, at_update, peak, setup = run_dir / "metrics.jsonl", None, {}, 0, {}
    while proc.poll() is None:
        try:
            now = memory(proc.pid)
            peak = max(peak, now.get("VmHWM", 0))
            if (
                not setup and "parameters;" in run_dir.with_suffix(f".{name}.log").read_text()
            ):  # setup done: data in place, no step yet
                setup = now
            if (
                seconds is None
                and metrics.exists()
                and any(
                    json.loads(line).get("step") == want_step
                    for line in metrics.read_text().splitlines()
                    if line.endswith("}")
                )
            ):
                seconds, at_update = time.time() - start, now
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    log.close()
    if proc.returncode != 0:
        raise SystemExit(f"run failed, see {run_dir.with_suffix(f'.{name}.log')}")
    return {
        "seconds": seconds,
        "peak_mb": peak,
        "setup_mb": setup.get("VmHWM", 0),
        "anon_mb": at_update.get("RssAnon", 0),
        "file_mb": at_update.get("RssFile", 0),
    }


def encoding_rate(log_file: Path) -> float | None:
    match = re.search(r"encoded (\d+) pairs in ([\d.]+) s", log_file.read_text())
    return int(match[1]) / float(match[2]) if match else None


def bench(n: int, work: Path, common: list[str], nocache: bool) -> dict:
    corpus = work / f"corpus_{n}"
    t0 = time.time()
    files = write_corpus(corpus, n)
    row: dict = {"pairs": n, "generate_s": time.time() - t0}
    data = [f"{k}={v}" for k, v in files.items()] + [f"data.cache_dir={work / f'cache_{n}'}"]
    shutil.rmtree(work / f"cache_{n}", ignore_errors=True)
    shutil.rmtree(work / f"runs_{n}", ignore_errors=True)
    runs = work / f"runs_{n}"
    runs.mkdir(parents=True)
    row["cold"] = first_update(runs / "cold", "cold", [*common, *data, "trainer.max_steps=1"], 1)
    row["encode_pairs_s"] = encoding_rate(runs / "cold.cold.log")
    row["cache_mb"] = sum(p.stat().st_size for p in (work / f"cache_{n}").glob("train-*/*")) / 2**20
    row["warm"] = first_update(runs / "warm", "warm", [*common, *data, "trainer.max_steps=1"], 1)
    row["resume"] = first_update(
        runs / "cold", "resume", [*common, *data, "trainer.max_steps=2", f"trainer.resume={runs / 'cold'}"], 2
    )
    if nocache:
        row["nocache"] = first_update(
            runs / "nocache", "nocache", [*common, *data, "data.cache=false", "trainer.max_steps=1"], 1
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000,4500000")
    parser.add_argument("--work", default="/tmp/bench_data")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--bpe-sample", type=int, default=200_000, help="data.tokenizer_sample for the bench runs")
    parser.add_argument(
        "--nocache-max", type=int, default=1_000_000, help="largest size also run with data.cache=false"
    )
    args = parser.parse_args()
    work = Path(args.work)
    common = [
        "experiment=tiny",
        "data.source=files",
        "data.format=text",
        f"data.vocab_size={args.vocab}",
        f"data.tokenizer_sample={args.bpe_sample}",
        "data.max_len=256",
        "data.max_tokens=1024",
        "data.valid_max_sentences=20",
        "evaluate_test=false",
        "trainer.eval_every=100000",
        "trainer.log_every=1",
        "trainer.threads=2",
        "decode.max_len_b=5",
        "decode.max_len_a=0",
    ]
    print(f"{os.cpu_count()} cores; vocab {args.vocab}; BPE sample {args.bpe_sample} pairs", flush=True)
    header = (
        "| pairs | first update: cold | warm fresh run | resume | nocache (in memory) | peak RSS at setup end: cold / resume / nocache "
        "| peak RSS: cold / resume | RSS at the update, resume (anon + file) | cache on disk | encoding |"
    )
    print(header, flush=True)
    print("|" + "---|" * (header.count("|") - 1), flush=True)
    for n in (int(float(s)) for s in args.sizes.split(",")):
        r = bench(n, work, common, n <= args.nocache_max)
        nc = r.get("nocache")
        nocache, nocache_mb = (f"{nc['seconds']:.1f} s", nc["setup_mb"]) if nc else ("-", "-")
        print(
            f"| {n:,} | {r['cold']['seconds']:.1f} s | {r['warm']['seconds']:.1f} s | {r['resume']['seconds']:.1f} s | "
            f"{nocache} | "
            f"{r['cold']['setup_mb']} / {r['resume']['setup_mb']} / {nocache_mb} MiB | {r['cold']['peak_mb']} / {r['resume']['peak_mb']} MiB | "
            f"{r['resume']['anon_mb']} + {r['resume']['file_mb']} MiB | {r['cache_mb']:.0f} MiB | {r['encode_pairs_s'] or 0:,.0f} pairs/s |",
            flush=True,
        )
        (work / f"result_{n}.json").write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
