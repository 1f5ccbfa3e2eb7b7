"""The supervised decoding process on a real uvicorn on 127.0.0.1, with faults injected:
kill -9 during a batch (only that batch's request fails, 503; a queued one is answered;
/ready false, then true; the restart counted), kill -9 while idle, a hung batch (SIGSTOP),
and on the batcher alone: a memory limit (restart after the batch is answered) and a
restart that keeps failing (back-off, 503 meanwhile, never 500)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")

from serve_live import free_port, live_server, metrics, wait_for  # noqa: E402
from transformer.config import DecodeConfig  # noqa: E402
from transformer.serve.batcher import Batcher, Job, WorkerLost  # noqa: E402
from transformer.serve.models import ServedModel, load_served_model  # noqa: E402
from transformer.serve.settings import ServeConfig  # noqa: E402
from transformer.serve.worker import ProcessDecoder, rss_mb  # noqa: E402

SENTENCES = ["twenty-one", "I have three red apples.", "the nineteen small dogs", "three hundred forty-five"]


@pytest.fixture(scope="module")
def server(tiny_run: Path) -> tuple[str, ServedModel]:
    """A live server whose model decodes in a supervised process (shared: each start costs seconds)."""
    cfg = ServeConfig(max_wait_ms=0)
    served = load_served_model("", str(tiny_run), "cpu", DecodeConfig(beam_size=2))
    served.decoder = ProcessDecoder(str(tiny_run), "cpu", DecodeConfig(beam_size=2), 1, cfg)
    try:
        with live_server(served, cfg) as base:
            yield base, served
    finally:
        served.decoder.close()


def test_the_server_process_loads_no_weights(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformer-serve with a decoding process: its own process reads each checkpoint's
    config, tokenizer and model shape, never the weights (no load_state_dict; parameters on
    the meta device); the worker loads them, once, and answers as an in-process translator."""
    import torch
    from fastapi.testclient import TestClient

    from transformer.decode.translator import Translator
    from transformer.serve import server as server_module
    from transformer.serve.settings import ServeRunConfig

    loads: list[str] = []
    load_state_dict = torch.nn.Module.load_state_dict

    def counted(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        loads.append(type(self).__name__)
        return load_state_dict(self, *args, **kwargs)

    seen: dict[str, Any] = {}

    class InProcess:  # instead of uvicorn: requests through the app, in this process
        def __init__(self, config: Any, state: Any, timeout_s: float):
            self.app, self.state = config.app, state

        def run(self) -> None:
            with TestClient(self.app) as client:
                seen["answer"] = client.post("/translate", json={"texts": SENTENCES}).json()
                seen["models"] = client.get("/models").json()["models"]
            model = self.state.models["en-de"].translator.models[0]
            seen["meta"] = all(p.is_meta for p in model.parameters())

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", counted)
    monkeypatch.setattr(server_module, "draining_server", InProcess)
    cfg = ServeRunConfig(checkpoint=str(tiny_run), device="cpu", port=free_port())  # nothing listens on it
    server_module.serve(cfg)  # serve.decode_process=true
    assert loads == [] and seen["meta"]
    reference = Translator.from_checkpoint(tiny_run, "cpu")
    assert loads == ["Transformer"]  # what counted would have seen of a load in this process
    assert [t["text"] for t in seen["answer"]["translations"]] == reference.translate(SENTENCES)
    assert seen["models"][0]["parameters"] == reference.models[0].num_parameters()


def post(base: str, texts: list[str], out: list) -> threading.Thread:
    """POST in a thread; the answer lands in ``out``."""
    thread = threading.Thread(
        target=lambda: out.append(httpx.post(f"{base}/translate", json={"texts": texts}, timeout=60))
    )
    thread.start()
    return thread


def ready(base: str) -> bool:
    return httpx.get(f"{base}/ready").status_code == 200


def codes(seen: dict[str, float]) -> set[str]:
    return {k.split('code="')[1].split('"')[0] for k in seen if k.startswith("transformer_serve_requests_total")}


@pytest.mark.slow
def test_killed_worker_fails_only_its_batch_and_comes_back(server: tuple[str, ServedModel]) -> None:
    base, served = server
    decoder = served.decoder
    assert ready(base)
    old = decoder.pid
    os.kill(old, signal.SIGSTOP)  # the batch goes into the pipe and stays in flight
    lost, kept = [], []
    first = post(base, SENTENCES[:2], lost)
    wait_for(lambda: metrics(base)['transformer_serve_queue_sentences{model="en-de"}'] == 0)
    wait_for(lambda: metrics(base)['transformer_serve_pending_sentences{model="en-de"}'] == 2)
    second = post(base, SENTENCES[2:], kept)  # queued behind the frozen batch
    wait_for(lambda: metrics(base)['transformer_serve_pending_sentences{model="en-de"}'] == 4)
    os.kill(old, signal.SIGKILL)
    first.join(60)
    assert lost[0].status_code == 503, lost[0].text
    assert "died during this batch (killed by SIGKILL" in lost[0].json()["error"]
    assert lost[0].headers["Retry-After"] == "1"
    assert not ready(base)  # the new process is still loading
    second.join(60)
    assert kept[0].status_code == 200  # queued, not in the lost batch: answered after the restart
    assert [t["text"] for t in kept[0].json()["translations"]] == served.translator.translate(
        SENTENCES[2:], beam_size=2
    )
    assert ready(base) and decoder.pid != old
    os.kill(decoder.pid, signal.SIGKILL)  # now while idle: noticed without any request
    wait_for(lambda: not ready(base))
    wait_for(lambda: ready(base), timeout=120)
    assert httpx.post(f"{base}/translate", json={"text": SENTENCES[0]}, timeout=60).status_code == 200
    seen = metrics(base)
    assert seen['transformer_serve_worker_restarts_total{model="en-de",reason="died"}'] == 2
    assert "500" not in codes(seen)


@pytest.mark.slow
def test_hung_batch_is_stopped(server: tuple[str, ServedModel]) -> None:
    base, served = server
    decoder = served.decoder
    decoder.batch_timeout_s = 0.5
    try:
        os.kill(decoder.pid, signal.SIGSTOP)  # hangs: no answer within serve.batch_timeout_s
        hung = httpx.post(f"{base}/translate", json={"text": SENTENCES[0]}, timeout=60)
    finally:
        decoder.batch_timeout_s = 60.0
    assert hung.status_code == 503 and "serve.batch_timeout_s=0.5" in hung.json()["error"]
    wait_for(lambda: ready(base), timeout=120)
    assert httpx.post(f"{base}/translate", json={"text": SENTENCES[1]}, timeout=60).status_code == 200
    seen = metrics(base)
    assert seen['transformer_serve_worker_restarts_total{model="en-de",reason="hung"}'] == 1
    assert "500" not in codes(seen)


def test_memory_limit_restarts_between_batches() -> None:
    """Past serve.worker_max_rss_mb the process is restarted after the batch is answered."""
    assert rss_mb(os.getpid()) > 1
    events: list[str] = []

    class Growing:
        ready = True

        def __call__(self, sentences: list[str], options: DecodeConfig, attention: bool) -> list:
            events.append("batch")
            return [[s] for s in sentences]

        def memory_mb(self) -> float | None:
            return 5000.0

        def restart(self) -> None:
            events.append("restart")

    worker = Growing()
    restarts: list[str] = []
    batcher = Batcher("m", worker, ServeConfig(max_wait_ms=0), lambda *a: None, worker, restarts.append)
    loop = asyncio.new_event_loop()
    job = Job(["a"], [2], DecodeConfig(beam_size=1), False, loop, loop.create_future())
    batcher.start()
    try:
        batcher.submit(job)
        wait_for(lambda: restarts == ["memory"])
    finally:
        batcher.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
    assert events == ["batch", "restart"] and job.future.result() == [["a"]]


class FlakyWorker:
    """A Worker whose process dies in its first batch and then fails to start ``failures`` times."""

    def __init__(self, failures: int):
        self.ready, self.failures, self.starts = True, failures, []

    def __call__(self, sentences: list[str], options: DecodeConfig, attention: bool) -> list:
        if len(self.starts) == 0:
            self.ready = False
            raise WorkerLost("the decoding process died during this batch (killed by SIGKILL)", "died")
        return [[s.upper()] for s in sentences]

    def memory_mb(self) -> float | None:
        return None

    def restart(self) -> None:
        self.starts.append(time.monotonic())
        if len(self.starts) <= self.failures:
            raise RuntimeError("no memory left")
        self.ready = True


def test_restart_backs_off_and_refuses_while_down() -> None:
    worker = FlakyWorker(failures=2)
    batcher = Batcher("m", worker, ServeConfig(restart_backoff_s=0.2, max_wait_ms=0), lambda *a: None, worker)
    loop = asyncio.new_event_loop()

    def job(text: str) -> Job:
        return Job([text], [2], DecodeConfig(beam_size=1), False, loop, loop.create_future())

    lost = job("a")
    batcher.start()
    try:
        batcher.submit(lost)
        wait_for(lambda: batcher.down is not None)
        with pytest.raises(Exception) as refused:
            batcher.submit(job("b"))
        assert refused.value.status == 503 and "failed to restart (no memory left)" in refused.value.message
        wait_for(lambda: batcher.ready, timeout=10)
        later = job("c")
        batcher.submit(later)
        wait_for(lambda: later.remaining == 0)
    finally:
        batcher.close()
        loop.run_until_complete(asyncio.sleep(0))  # deliver the answers sent to the loop
        loop.close()
    assert isinstance(lost.future.exception(), Exception) and lost.future.exception().status == 503
    assert later.future.result() == [["C"]]
    gaps = [b - a for a, b in zip(worker.starts, worker.starts[1:])]
    assert len(worker.starts) == 3 and gaps[0] >= 0.2 and gaps[1] >= 0.4  # none for the first, then doubling
