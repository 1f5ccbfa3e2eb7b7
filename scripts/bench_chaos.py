"""transformer-serve under faults: steady load, then the decoding process killed (kill -9),
slow clients, oversized and over-deep bodies, and the worst request inside every limit,
each phase with the steady load still running. Prints, per phase: requests answered,
failed (by status), peak resident memory of the server and of its decoding process; then
the recovery after the kill (time to the next good answer, /ready false then true) and how
long the worst in-limit request delays a small one.

Loopback only (the server listens on 127.0.0.1, a free port), bounded in count and time:
``--seconds`` per phase (5 phases), at most ``--clients`` steady clients and ``--slow``
slow connections.

    python scripts/bench_chaos.py                       # runs/builtin
    python scripts/bench_chaos.py --checkpoint RUN --seconds 5 --clients 4
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx

from bench_serve import percentile, source_sentences, start_server
from transformer.serve.worker import rss_mb

PHASES = ("steady", "worker killed", "slow clients", "oversized bodies", "worst in-limit request")


def children(pid: int) -> list[int]:
    """The server's decoding processes (children started by multiprocessing's spawn, not its
    resource tracker), from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return [c for c in found if b"spawn_main" in command_line(c) and b"resource_tracker" not in command_line(c)]


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class Sampler(threading.Thread):
    """Peak resident memory (MiB) of the server and of its children, per phase, every 50 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.phase, self.stopped = pid, PHASES[0], threading.Event()
        self.peaks: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            peak = self.peaks[self.phase]
            peak[0] = max(peak[0], rss_mb(self.pid) or 0.0)
            peak[1] = max(peak[1], sum(rss_mb(c) or 0.0 for c in children(self.pid)))


class Load:
    """Steady clients, each sending one sentence per request until stopped; answers by status."""

    def __init__(self, base: str, sentences: list[str], clients: int):
        self.base, self.sentences, self.clients = base, sentences, clients
        self.statuses: collections.Counter = collections.Counter()
        self.answered: list[tuple[float, int]] = []  # (time, status) of every answer
        self.running = True

    async def client(self, k: int) -> None:
        async with httpx.AsyncClient(base_url=self.base, timeout=60, limits=httpx.Limits(max_connections=1)) as http:
            i = k
            while self.running:
                try:
                    status = (
                        await http.post("/translate", json={"text": self.sentences[i % len(self.sentences)]})
                    ).status_code
                except httpx.TransportError:
                    status = 0  # no answer: the connection failed
                self.statuses[status] += 1
                self.answered.append((time.monotonic(), status))
                i += self.clients
                if status != 200:
                    await asyncio.sleep(0.1)

    async def run(self) -> None:
        await asyncio.gather(*(self.client(k) for k in range(self.clients)))


async def kill_worker(base: str, pid: int, load: Load, seconds: float) -> dict:
    """kill -9 the decoding process under load; time until the next good answer and whether
    /ready was seen false, then true."""
    worker = children(pid)
    os.kill(worker[0], signal.SIGKILL)
    killed = time.monotonic()
    seen, recovered = [], None
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        while time.monotonic() < killed + max(seconds, 30):
            seen.append((await http.get("/ready")).status_code == 200)
            recovered = next((t for t, status in load.answered if t > killed and status == 200), None)
            if recovered is not None and seen[-1]:
                break
            await asyncio.sleep(0.05)
    return {
        "recovery_s": None if recovered is None else recovered - killed,
        "ready_false_then_true": False in seen and seen[-1],
    }


async def slow_clients(port: int, count: int, seconds: float) -> dict:
    """Connections that send their headers, or their body, a byte a second: how many the
    server closed within the phase."""

    async def one(k: int) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = b"POST /translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        data = head + (b"Content-Length: 100\r\n\r\n{" if k % 2 else b"")
        deadline = time.monotonic() + seconds
        try:
            writer.write(data)
            while time.monotonic() < deadline:
                try:
                    if await asyncio.wait_for(reader.read(65536), 1.0) == b"":
                        return True  # closed by the server
                except TimeoutError:
                    writer.write(b"a")
            return False
        except OSError:
            return True
        finally:
            writer.close()

    closed = await asyncio.gather(*(one(k) for k in range(count)))
    return {"slow_closed": sum(closed), "slow_total": count}


async def oversized(base: str, port: int, seconds: float) -> dict:
    """A declared 200 MB body, a chunked one past the cap, JSON nested 20,000 deep, in turn."""
    statuses: collections.Counter = collections.Counter()
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        while time.monotonic() < deadline:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(
                    b"POST /translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 200000000\r\n\r\n" + b"a" * 1_000_000
                )
                statuses[(await reader.read(12))[9:12].decode() or "closed"] += 1
            except OSError:
                statuses["closed"] += 1
            finally:
                writer.close()

            async def chunks():
                for _ in range(200):  # 200 x 64 KB without a Content-Length
                    yield b"a" * 65536

            try:
                answer = await http.post("/translate", content=chunks(), headers={"Content-Type": "application/json"})
                statuses[str(answer.status_code)] += 1
            except httpx.TransportError:
                statuses["closed"] += 1
            deep = b"[" * 20000 + b"]" * 20000
            answer = await http.post("/translate", content=deep, headers={"Content-Type": "application/json"})
            statuses[str(answer.status_code)] += 1
    return {"oversized": dict(statuses)}


async def worst_request(base: str, limits: dict, seconds: float) -> dict:
    """The most expensive request the limits allow (max_sentences of max_chars, the largest
    beam, n_best filling serve.max_request_cost, word alignments), with a small request sent
    every 0.25 s beside it: the small ones' latencies during the big one."""
    beam = limits["max_beam_size"]
    n_best = max(1, min(beam, limits["max_request_cost"] // (limits["max_sentences"] * beam)))
    words = "the nineteen small dogs have three red apples and twenty-one cats "
    sentence = (words * (limits["max_chars"] // len(words) + 1))[: limits["max_chars"]]
    body = {"texts": [sentence] * limits["max_sentences"], "beam_size": beam, "n_best": n_best, "alignment": True}
    small: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        big = asyncio.ensure_future(http.post("/translate", json=body))
        started = time.monotonic()
        while not big.done() and time.monotonic() < started + max(seconds, 120):
            sent = time.monotonic()
            if (await http.post("/translate", json={"text": "twenty-one"})).status_code == 200:
                small.append(time.monotonic() - sent)
            await asyncio.sleep(0.25)
        answer = await big
    return {
        "worst_status": answer.status_code,
        "worst_s": time.monotonic() - started,
        "worst_answer_mb": len(answer.content) / 2**20,
        "worst_shape": f"{limits['max_sentences']} x {limits['max_chars']} chars, beam {beam}, n_best {n_best}",
        "small_max_s": max(small, default=float("nan")),
        "small_p50_s": percentile(small, 0.5) if small else float("nan"),
    }


async def phases(base: str, pid: int, args: argparse.Namespace, sampler: Sampler, sentences: list[str]) -> dict:
    """Run the phases in turn under the steady load; per phase, the load's answers by status."""
    port = int(base.rsplit(":", 1)[1])
    load = Load(base, sentences, args.clients)
    running = asyncio.ensure_future(load.run())
    limits = json.loads(args.limits)
    steps = {
        "steady": lambda: asyncio.sleep(args.seconds),
        "worker killed": lambda: kill_worker(base, pid, load, args.seconds),
        "slow clients": lambda: slow_clients(port, args.slow, max(args.seconds, 8)),  # past the 5 s timeouts
        "oversized bodies": lambda: oversized(base, port, args.seconds),
        "worst in-limit request": lambda: worst_request(base, limits, args.seconds),
    }
    results: dict = {"by_phase": {}}
    for phase in PHASES:
        sampler.phase = phase
        before = collections.Counter(load.statuses)
        results |= await steps[phase]() or {}
        results["by_phase"][phase] = load.statuses - before
    load.running = False
    await running
    return results


def report(results: dict, sampler: Sampler) -> None:
    print("\n| phase | answered 200 | failed (by status) | server peak MiB | worker peak MiB |\n|---|---|---|---|---|")
    for phase in PHASES:
        counts = results["by_phase"][phase]
        failed = ", ".join(f"{s or 'no answer'}: {n}" for s, n in sorted(counts.items()) if s != 200) or "none"
        server, worker = sampler.peaks[phase]
        print(f"| {phase} | {counts.get(200, 0)} | {failed} | {server:.0f} | {worker:.0f} |")
    steady, adversarial = sampler.peaks["steady"][0], max(sampler.peaks[p][0] for p in PHASES[1:])
    recovery = results["recovery_s"]
    print(
        f"\nafter kill -9: next good answer in {'never' if recovery is None else f'{recovery:.1f} s'}; "
        f"/ready false then true: {results['ready_false_then_true']}"
    )
    print(f"slow connections closed by the server: {results['slow_closed']} of {results['slow_total']}")
    print(f"oversized and over-deep bodies, answers by status: {results['oversized']}")
    print(
        f"worst in-limit request ({results['worst_shape']}): status {results['worst_status']}, "
        f"{results['worst_s']:.1f} s, answer {results['worst_answer_mb']:.2f} MiB; small requests beside it: "
        f"max {results['small_max_s']:.2f} s, median {results['small_p50_s']:.2f} s"
    )
    fives = sum(c.get(500, 0) for c in results["by_phase"].values())
    print(f"server peak memory, adversarial / steady: {adversarial / steady:.2f}x; 500 answers: {fives}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/builtin")
    parser.add_argument("--src", help="source sentences, one a line (default: the checkpoint's test split or test2016)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--clients", type=int, default=8, help="steady clients (one request at a time each)")
    parser.add_argument("--slow", type=int, default=32, help="slow connections in their phase")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument(
        "--limits",
        default='{"max_sentences": 64, "max_chars": 1000, "max_beam_size": 16, "max_request_cost": 4096}',
        help="the server's serve.* limits (JSON), which the worst request fills",
    )
    args = parser.parse_args()
    args.max_wait_ms, args.max_batch_tokens = 5.0, 8192
    sentences, origin = source_sentences(args.checkpoint, args.src, 200)
    extra = tuple(f"serve.{k}={v}" for k, v in json.loads(args.limits).items()) + (
        "serve.max_queue=4096",
        "serve.header_timeout_s=5",
        "serve.body_timeout_s=5",
    )
    print(f"{len(sentences)} sentences from {origin}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    server, base = start_server(args.checkpoint, True, args, extra)
    sampler = Sampler(server.pid)
    sampler.start()
    try:
        results = asyncio.run(phases(base, server.pid, args, sampler, sentences))
    finally:
        sampler.stopped.set()
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    report(results, sampler)


if __name__ == "__main__":
    main()
