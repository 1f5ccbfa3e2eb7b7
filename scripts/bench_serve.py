"""transformer-serve under load: sentences/s and latency from 1, 8 and 32 concurrent clients,
with dynamic batching on and off, against transformer-decode on the same sentences as a file.

The server runs as its own process on 127.0.0.1 (a free port); each client (httpx async)
sends one sentence per request, the next as soon as the last is answered, until the
sentences or the time are used up. Mean batch size comes from the server's /metrics.
Sources: the checkpoint's own test split (the builtin corpus for runs/builtin) or Multi30k
test2016 for a checkpoint trained on it (or --src FILE).

    python scripts/bench_serve.py                                  # runs/builtin
    python scripts/bench_serve.py --checkpoint runs/multi30k --sentences 400 --seconds 40
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import httpx  # noqa: E402

from transformer.checkpoint import load_checkpoint, resolve_checkpoint  # noqa: E402
from transformer.config import DataConfig, DecodeConfig  # noqa: E402
from transformer.data.corpus import load_files  # noqa: E402
from transformer.data.sources import load_split  # noqa: E402
from transformer.decode.translator import Translator  # noqa: E402

MULTI30K = Path(os.environ.get("MULTI30K_DIR", "../shared/data/multi30k")) / "test2016.en.gz"


def source_sentences(checkpoint: str, src: str | None, count: int) -> tuple[list[str], str]:
    """``count`` sentences to send and where they come from."""
    if src:
        return load_files(src, None)[0][:count], src
    data = load_checkpoint(resolve_checkpoint(checkpoint)).get("config", {}).get("data", {})
    if data.get("source") == "builtin":
        return [s for s, _ in load_split(DataConfig(**data), "test")][:count], "the builtin test split"
    if not MULTI30K.is_file():
        sys.exit(f"{MULTI30K} not found: give --src FILE")
    return load_files(str(MULTI30K), None)[0][:count], str(MULTI30K)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    checkpoint: str, batching: bool, args: argparse.Namespace, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, str]:
    """transformer-serve on 127.0.0.1 (a free port) with the benchmark's settings and ``extra``
    key=value ones; returns once /health answers."""
    port = free_port()
    script = Path(sys.executable).parent / "transformer-serve"
    command = [
        str(script),
        f"checkpoint={checkpoint}",
        "host=127.0.0.1",
        f"port={port}",
        "log_level=warning",
        "device=cpu",
        f"serve.batching={str(batching).lower()}",
        f"serve.max_wait_ms={args.max_wait_ms}",
        f"serve.max_batch_tokens={args.max_batch_tokens}",
        f"decode.beam_size={args.beam}",
        f"serve.threads={args.threads}",
        "serve.max_queue=100000",
        *extra,
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"server exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return server, base
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    sys.exit("server did not start within 120 s")


def batch_totals(base: str) -> tuple[float, float]:
    """(sentences, batches) decoded so far, from /metrics."""
    values = dict(
        line.rsplit(" ", 1)
        for line in httpx.get(f"{base}/metrics").text.splitlines()
        if line.startswith("transformer_serve_batch_sentences_")
    )
    total = sum(float(v) for k, v in values.items() if k.startswith("transformer_serve_batch_sentences_sum"))
    count = sum(float(v) for k, v in values.items() if k.startswith("transformer_serve_batch_sentences_count"))
    return total, count


async def load(base: str, sentences: list[str], clients: int, seconds: float) -> tuple[list[float], float]:
    """Latencies of the answered requests and the wall time they took."""
    latencies: list[float] = []
    todo = iter(sentences)
    stop = time.perf_counter() + seconds

    async def client() -> None:
        # a client of its own per simulated user: one shared pool of 32 connections costs
        # httpx ~2.5x the CPU per request of 8 (measured), and this process shares the cores
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=httpx.Limits(max_connections=1)) as http:
            for sentence in todo:
                if time.perf_counter() > stop:
                    return
                sent = time.perf_counter()
                answer = await http.post("/translate", json={"text": sentence})
                answer.raise_for_status()
                latencies.append(time.perf_counter() - sent)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(base: str, sentences: list[str], clients: int, seconds: float) -> dict:
    asyncio.run(load(base, sentences[:8], min(clients, 8), seconds))  # warm-up: connections, allocator
    before, cpu = batch_totals(base), time.process_time()
    latencies, wall = asyncio.run(load(base, sentences, clients, seconds))
    cpu, after = time.process_time() - cpu, batch_totals(base)
    batches = after[1] - before[1]
    return {
        "clients": clients,
        "sentences": len(latencies),
        "per_s": len(latencies) / wall,
        "p50": percentile(latencies, 0.5),
        "p95": percentile(latencies, 0.95),
        "p99": percentile(latencies, 0.99),
        "batch": (after[0] - before[0]) / batches if batches else 0.0,
        "client_cpu": cpu / wall,
    }


def decode_file_speed(checkpoint: str, sentences: list[str], beam: int) -> float:
    """Sentences/s of transformer-decode's path (translate_stream, 1,024-line chunks) on the
    same sentences, model loading excluded."""
    translator = Translator.from_checkpoint(checkpoint, device="cpu", config=DecodeConfig(beam_size=beam))
    translator.translate("warm up")
    started = time.perf_counter()
    done = sum(1 for _ in translator.translate_stream(iter(sentences), chunk=1024))
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/builtin")
    parser.add_argument("--src", help="source sentences, one a line (default: the checkpoint's test split or test2016)")
    parser.add_argument("--sentences", type=int, default=300, help="sentences per run at most")
    parser.add_argument("--seconds", type=float, default=30.0, help="time per run at most")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-batch-tokens", type=int, default=8192, help="source subwords x beam per batch")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="the server's torch threads (1: the clients need the other core; 0: PyTorch's default)",
    )
    args = parser.parse_args()
    sentences, origin = source_sentences(args.checkpoint, args.src, args.sentences)
    print(
        f"{len(sentences)} sentences from {origin}; beam {args.beam}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start"
    )
    rows = []
    for batching in (True, False):
        server, base = start_server(args.checkpoint, batching, args)
        try:
            for clients in (int(c) for c in args.clients.split(",")):
                rows.append(
                    {"mode": "batching on" if batching else "batching off"}
                    | measure(base, sentences, clients, args.seconds)
                )
                print(rows[-1], flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    decode = decode_file_speed(args.checkpoint, sentences, args.beam)
    print(
        "\n| mode | clients | sentences | sentences/s | p50 ms | p95 ms | p99 ms | mean batch | client CPU |\n|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['mode']} | {r['clients']} | {r['sentences']} | {r['per_s']:.1f} | {1000 * r['p50']:.0f} | {1000 * r['p95']:.0f} | {1000 * r['p99']:.0f} | {r['batch']:.1f} | {100 * r['client_cpu']:.0f}% |"
        )
    print(f"| transformer-decode (file) | - | {len(sentences)} | {decode:.1f} | - | - | - | - | - |")
    on, off = ({r["clients"]: r for r in rows if r["mode"] == mode} for mode in ("batching on", "batching off"))
    top = max(on)
    print(
        f"\nat {top} clients: batching on / off = {on[top]['per_s'] / off[top]['per_s']:.1f}x; on / transformer-decode = {on[top]['per_s'] / decode:.2f}; p99 {1000 * on[top]['p99']:.0f} ms; load average {os.getloadavg()[0]:.1f} at the end"
    )


if __name__ == "__main__":
    main()
