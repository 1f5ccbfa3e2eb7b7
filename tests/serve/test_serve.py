"""transformer-serve on the tiny run: answers equal Translator's, requests batched across
clients, every refusal with its status, the full queue, a client that goes away, SIGTERM,
and the demo page in headless Chromium. Servers listen on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed: pip install -e '.[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from serve_live import free_port, live_server, metrics, wait_for  # noqa: E402
from transformer.config import DecodeConfig  # noqa: E402
from transformer.serve.app import create_app  # noqa: E402
from transformer.serve.models import ServedModel, load_served_model  # noqa: E402
from transformer.serve.settings import ServeConfig  # noqa: E402

SENTENCES = ["twenty-one", "I have three red apples.", "the nineteen small dogs", "three hundred forty-five"]


@pytest.fixture(scope="module")
def served(tiny_run: Path) -> ServedModel:
    return load_served_model("", str(tiny_run), "cpu", DecodeConfig())


def test_answers_equal_translator(served: ServedModel) -> None:
    translator = served.translator
    with TestClient(create_app([served], ServeConfig())) as client:
        answer = client.post("/translate", json={"texts": SENTENCES, "beam_size": 3, "n_best": 2})
        assert answer.status_code == 200, answer.text
        expected = translator.hypotheses(SENTENCES, beam_size=3, n_best=2)
        for got, hyps in zip(answer.json()["translations"], expected):
            assert [h["text"] for h in got["hypotheses"]] == [h.text for h in hyps]
            assert [h["score"] for h in got["hypotheses"]] == pytest.approx([h.score for h in hyps], abs=1e-3)
            assert got["text"] == hyps[0].text
        one = client.post("/translate", json={"text": SENTENCES[1], "beam_size": 1, "scores": False}).json()
        assert one["translations"][0] == {
            "text": translator.translate(SENTENCES[1], beam_size=1),
            "hypotheses": [{"text": translator.translate(SENTENCES[1], beam_size=1)}],
        }
        aligned = client.post("/translate", json={"text": SENTENCES[1], "attention": True}).json()["translations"][0][
            "hypotheses"
        ][0]["alignment"]
        weights = translator.hypotheses([SENTENCES[1]], attention=True)[0][0].attention
        assert (
            aligned["source"] == translator.tokenizer.src_pieces(SENTENCES[1])
            and len(aligned["target"]) == weights.shape[0]
        )
        torch.testing.assert_close(torch.tensor(aligned["weights"]), weights, atol=1e-4, rtol=0)
        assert aligned["pairs"].split() == [f"{i}-{j}" for j, i in enumerate(weights.argmax(1).tolist())]
        models = client.get("/models").json()["models"]
        assert [(m["name"], m["source_language"], m["parameters"]) for m in models] == [
            ("en-de", "en", translator.models[0].num_parameters())
        ]
        assert models[0]["decode_defaults"]["beam_size"] == 5


def test_concurrent_requests_share_batches(served: ServedModel) -> None:
    requests = [SENTENCES[k:] + SENTENCES[:k] for k in range(4)] + [[SENTENCES[0]], [SENTENCES[2], SENTENCES[2]]]

    async def send_all(base: str) -> list[dict]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            answers = await asyncio.gather(
                *(client.post("/translate", json={"texts": texts, "beam_size": 2}) for texts in requests)
            )
        assert all(a.status_code == 200 for a in answers)
        return [a.json() for a in answers]

    with live_server(served, ServeConfig(max_wait_ms=300)) as base:
        answers = asyncio.run(send_all(base))
        seen = metrics(base)
    for texts, answer in zip(requests, answers):
        assert [t["text"] for t in answer["translations"]] == served.translator.translate(texts, beam_size=2)
    batches = seen['transformer_serve_batch_requests_count{model="en-de"}']
    assert (
        seen['transformer_serve_batch_requests_bucket{model="en-de",le="1"}'] < batches
    )  # some batch held > 1 request
    assert seen['transformer_serve_sentences_total{model="en-de"}'] == sum(map(len, requests))
    assert seen['transformer_serve_requests_total{code="200",path="/translate"}'] == len(requests)


BAD_REQUESTS = [
    (b'{"text": "unclosed', 400, None),
    (b'{"text": "caf\xe9"}', 400, None),
    (b'["a list"]', 422, None),
    (b'{"text": 3}', 422, "text"),
    (b'{"texts": ["ok", 3]}', 422, "texts.1"),
    (b'{"text": "a", "beam_size": "5"}', 422, "beam_size"),
    (b'{"text": "a", "beam_size": 0}', 422, "beam_size"),
    (b'{"text": "a", "beam_size": 17}', 422, "beam_size"),
    (b'{"text": "a", "temperature": 0, "sampling": true}', 422, "temperature"),
    (b'{"text": "a", "colour": "red"}', 422, "colour"),
    (b'{"text": "a", "texts": ["b"]}', 422, "text"),
    (b'{"texts": []}', 422, "texts"),
    (json.dumps({"texts": ["a"] * 5}).encode(), 413, "texts"),
    (json.dumps({"texts": ["a", "b" * 41]}).encode(), 413, "texts.1"),
    (b'{"text": "a", "model": "fr-en"}', 404, "model"),
]


def test_bad_requests_get_their_status(served: ServedModel) -> None:
    with TestClient(create_app([served], ServeConfig(max_sentences=4, max_chars=40))) as client:
        for body, status, field in BAD_REQUESTS:
            answer = client.post("/translate", content=body, headers={"Content-Type": "application/json"})
            assert answer.status_code == status, (body, answer.text)
            assert answer.json()["error"] and answer.json().get("field") == field, (body, answer.text)
        assert client.get("/translate").status_code == 405 and "error" in client.get("/nowhere").json()
        assert client.get("/health").json()["status"] == "ok"
        assert client.post("/translate", json={"text": SENTENCES[0]}).status_code == 200


def test_full_queue_answers_429(served: ServedModel) -> None:
    with live_server(served, ServeConfig(max_queue=3, max_wait_ms=1500)) as base:
        first: list[httpx.Response] = []
        sender = threading.Thread(
            target=lambda: first.append(httpx.post(f"{base}/translate", json={"texts": SENTENCES[:3]}, timeout=30))
        )
        sender.start()
        wait_for(lambda: metrics(base)['transformer_serve_pending_sentences{model="en-de"}'] == 3)
        refused = httpx.post(f"{base}/translate", json={"text": SENTENCES[3]})
        assert (
            refused.status_code == 429
            and refused.headers["Retry-After"] == "1"
            and "queue full" in refused.json()["error"]
        )
        sender.join(30)
        assert first[0].status_code == 200 and len(first[0].json()["translations"]) == 3
        assert httpx.post(f"{base}/translate", json={"text": SENTENCES[3]}).status_code == 200


def test_request_of_a_client_that_left_is_dropped(served: ServedModel) -> None:
    with live_server(served, ServeConfig(max_wait_ms=800)) as base:
        port = int(base.rsplit(":", 1)[1])
        body = json.dumps({"texts": SENTENCES}).encode()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(
                b"POST /translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            wait_for(lambda: metrics(base)['transformer_serve_pending_sentences{model="en-de"}'] == 4)
        wait_for(lambda: metrics(base).get('transformer_serve_cancelled_requests_total{model="en-de"}') == 1)
        time.sleep(1.0)  # past max_wait_ms: the worker has let the batch go
        seen = metrics(base)
        assert seen['transformer_serve_pending_sentences{model="en-de"}'] == 0
        assert 'transformer_serve_sentences_total{model="en-de"}' not in seen  # nothing was decoded
        assert httpx.post(f"{base}/translate", json={"text": SENTENCES[0]}).status_code == 200


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight(served: ServedModel, tiny_run: Path, tmp_path: Path) -> None:
    """A real server (decoding in its child process) drains on SIGTERM."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    script = Path(sys.executable).parent / "transformer-serve"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    server = subprocess.Popen(
        [
            str(script),
            f"checkpoint={tiny_run}",
            f"port={port}",
            "serve.max_wait_ms=2500",
            "log_level=warning",
            "device=cpu",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def healthy() -> bool:
            assert server.poll() is None, server.stdout.read()
            try:
                return httpx.get(f"{base}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(
            healthy, timeout=180
        )  # the server and its decoding process load the model (slow when the machine is busy)
        answers: list[httpx.Response] = []
        sender = threading.Thread(
            target=lambda: answers.append(httpx.post(f"{base}/translate", json={"text": SENTENCES[1]}, timeout=30))
        )
        sender.start()
        wait_for(lambda: metrics(base)['transformer_serve_pending_sentences{model="en-de"}'] == 1)
        server.send_signal(signal.SIGTERM)
        wait_for(lambda: metrics(base)["transformer_serve_draining"] == 1)
        late = httpx.post(f"{base}/translate", json={"text": SENTENCES[0]})
        assert late.status_code == 503 and "shutting down" in late.json()["error"]
        sender.join(30)
        assert answers[0].status_code == 200 and answers[0].json()["translations"][0][
            "text"
        ] == served.translator.translate(SENTENCES[1])
        server.wait(20)
        output = server.stdout.read()
        assert "Traceback" not in output and "EOFError" not in output, output  # the child leaves quietly
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_several_models_by_name(tiny_run: Path) -> None:
    from omegaconf import OmegaConf

    from transformer.serve.models import load_models
    from transformer.serve.settings import ServeRunConfig

    given = OmegaConf.from_cli([f"models={{en-de: {tiny_run}, copy: {tiny_run}}}", "device=cpu", "decode.beam_size=2"])
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ServeRunConfig), given))
    models = load_models(cfg)
    with TestClient(create_app(models, cfg.serve)) as client:
        listed = client.get("/models").json()["models"]
        assert [(m["name"], m["decode_defaults"]["beam_size"]) for m in listed] == [("en-de", 2), ("copy", 2)]
        answer = client.post("/translate", json={"text": SENTENCES[0], "model": "copy"}).json()
        assert answer["model"] == "copy" and answer["translations"][0]["text"] == models[0].translator.translate(
            SENTENCES[0]
        )


def test_command_names_a_bad_setting(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from transformer.cli.serve import run as serve_cli

    for argv, message in (
        ([f"checkpoint={tiny_run}", "serve.max_queue=0"], "error: serve.max_queue=0 must be > 0"),
        ([f"checkpoint={tiny_run}", "serve.body_timeout_s=-1"], "error: serve.body_timeout_s=-1.0 must be > 0"),
        ([f"checkpoint={tiny_run}", "port=99999"], "error: port=99999 must be in [1, 65535]"),
        (["port=1"], "error: give checkpoint=RUN_DIR_OR_PT or models={name: RUN, ...}"),
    ):
        monkeypatch.setattr(sys, "argv", ["transformer-serve", *argv])
        with pytest.raises(SystemExit) as stopped:
            serve_cli()
        assert stopped.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_page_translates_in_a_browser(served: ServedModel) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    sentence = SENTENCES[2]
    with live_server(served, ServeConfig()) as base, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(base)
            page.wait_for_selector("#model option", state="attached")
            page.fill("#source", sentence)
            page.click("#translate")
            page.wait_for_function("document.querySelector('#translation').textContent.length > 0")
            shown = page.inner_text("#translation")
            rows = page.locator("#heatmap tbody tr").count()
            listed = page.locator("#nbest li").count()
        finally:
            browser.close()
    best = served.translator.hypotheses([sentence], attention=True, beam_size=5, n_best=5)[0]
    assert shown == best[0].text
    assert rows == len(best[0].tokens) and listed == len(best)
