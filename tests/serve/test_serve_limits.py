"""transformer-serve's limits on a real uvicorn on 127.0.0.1: bodies refused on their
Content-Length before they are read or cut at the cap, slow bodies and slow headers, idle
keep-alive connections, the connection cap, over-deep JSON, request cost, attention size,
decode values; the Host allow-list, the token, JSON only, CORS; per-request tgt_lang on a
tagged and an untagged model side by side; blank lines; a small request not queued behind
a big one."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")

from serve_live import live_server, raw_request, read_response  # noqa: E402
from transformer.config import DecodeConfig  # noqa: E402
from transformer.serve.api import max_body_bytes  # noqa: E402
from transformer.serve.batcher import Batcher, Job  # noqa: E402
from transformer.serve.models import ServedModel, load_served_model  # noqa: E402
from transformer.serve.settings import ServeConfig  # noqa: E402

SMALL = ServeConfig(max_sentences=4, max_chars=40, body_timeout_s=0.5, header_timeout_s=0.5, keep_alive_s=1)


@pytest.fixture(scope="module")
def served(tiny_run: Path) -> ServedModel:
    return load_served_model("", str(tiny_run), "cpu", DecodeConfig(beam_size=2))


@pytest.fixture(scope="module")
def base(served: ServedModel) -> str:
    with live_server(served, SMALL) as url:
        yield url


def post(base: str, body: bytes | dict, **headers: str) -> httpx.Response:
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    return httpx.post(
        f"{base}/translate", content=content, headers={"Content-Type": "application/json", **headers}, timeout=30
    )


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def test_body_refused_on_its_length_before_it_is_read(base: str) -> None:
    """A declared 1 GB body is answered 413 at once, though not one byte of it was sent."""
    started = time.monotonic()
    answer = raw_request(
        port_of(base),
        b"POST /translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 413") and b"Content-Length 1000000000" in answer
    assert time.monotonic() - started < SMALL.body_timeout_s  # not the body timeout: refused before reading


def test_body_without_length_is_cut_at_the_cap(base: str) -> None:
    """A chunked body (no Content-Length to refuse on) is answered 413 once the bytes read
    pass the cap, while the client is still sending."""
    cap = max_body_bytes(SMALL)
    with socket.create_connection(("127.0.0.1", port_of(base)), timeout=10) as s:
        s.sendall(
            b"POST /translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        piece = b"%x\r\n%s\r\n" % (8192, b"a" * 8192)
        sent = 0
        try:
            while not select.select([s], [], [], 0)[0]:
                assert sent < 100 * cap, "the server read 100 times its cap without answering"
                s.sendall(piece)
                sent += 8192
            answer = read_response(s)
        except ConnectionResetError:  # answered and closed while this side still wrote: the answer may be lost
            answer = None
    assert sent < 100 * cap
    assert answer is None or (answer.startswith(b"HTTP/1.1 413") and f"passed {cap} bytes".encode() in answer)


def test_slow_body_gets_408_and_slow_headers_are_closed(base: str) -> None:
    answer = raw_request(
        port_of(base),
        b"POST /translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )
    assert answer.startswith(b"HTTP/1.1 408") and b"serve.body_timeout_s=0.5" in answer
    started = time.monotonic()
    assert raw_request(port_of(base), b"POST /translate HTTP/1.1\r\nHost: 127.0.0.1\r\n") == b""  # closed, unanswered
    assert time.monotonic() - started < 5


def test_idle_keep_alive_connection_is_closed(base: str) -> None:
    with socket.create_connection(("127.0.0.1", port_of(base)), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert s.recv(65536) == b""  # the server closes it after serve.keep_alive_s
        assert time.monotonic() - started < 5


def test_connection_cap(served: ServedModel) -> None:
    with live_server(served, ServeConfig(max_connections=2)) as url:
        idle = [socket.create_connection(("127.0.0.1", port_of(url))) for _ in range(2)]
        try:
            time.sleep(0.2)
            assert httpx.get(f"{url}/health").status_code == 503
        finally:
            for s in idle:
                s.close()
        time.sleep(0.2)
        assert httpx.get(f"{url}/health").status_code == 200


def test_oversized_headers_are_refused(base: str) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 100_000
    assert raw_request(port_of(base), head + b"\r\n\r\n").startswith(b"HTTP/1.1 431")  # whole, in one piece
    with socket.create_connection(("127.0.0.1", port_of(base)), timeout=10) as s:  # arriving in pieces: h11's cap
        s.sendall(head[:20_000])
        time.sleep(0.1)
        s.sendall(head[20_000:40_000])
        assert s.recv(65536).startswith(b"HTTP/1.1 400")


BAD = [
    (b"[" * 20_000 + b"]" * 20_000, 400, None, "nested deeper"),
    (b'{"text": "a", "beam_size": ' + b"9" * 5000 + b"}", 400, None, "4300 digits"),
    ({"text": "a", "beam_size": 2, "n_best": 3}, 422, "n_best", "larger than beam_size=2"),
    ({"text": "a", "n_best": 3}, 422, "n_best", "beam_size=2"),  # the server's default beam
    ({"text": "a", "top_p": 2.0, "sampling": True}, 422, "top_p", ""),
    ({"text": "a", "top_p": 1e-300, "sampling": True}, 422, "top_p", ""),  # 0 in float32: nothing to sample
    ({"text": "a", "temperature": 1e308, "sampling": True}, 422, "temperature", ""),  # inf in float32
    ({"text": "a", "length_penalty": -1e308}, 422, "length_penalty", ""),
    (b'{"texts": ["a", "\\ud800"]}', 422, "texts.1", "lone surrogate"),  # no text to tokenize
    ({"text": "a", "length_penalty": float("nan")}, 422, "length_penalty", "finite"),
    ({"texts": ["a"] * 4, "beam_size": 16, "n_best": 16}, 413, "texts", "serve.max_request_cost=1000"),
    ({"text": "a", "beam_size": 16, "n_best": 16, "attention": True}, 413, "attention", "max_attention_cells"),
    ({"text": "a", "tgt_lang": "fr"}, 422, "tgt_lang", "only into de"),
]


def test_bad_requests_name_their_field(served: ServedModel) -> None:
    cfg = ServeConfig(max_sentences=4, max_chars=40, max_request_cost=1000, max_attention_cells=100)
    with live_server(served, cfg) as url:
        for body, status, field, message in BAD:
            answer = post(url, body)
            assert answer.status_code == status, (body, answer.text)
            assert answer.json().get("field") == field and message in answer.json()["error"], answer.text
        for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
            answer = post(url, {"text": "a"}, **{"Content-Type": content_type})
            assert answer.status_code == 415 and "application/json" in answer.json()["error"]
        aligned = post(url, {"text": "twenty-one", "alignment": True}).json()["translations"][0]["hypotheses"][0]
        assert set(aligned["alignment"]) == {"source", "target", "words"}  # word links, no matrix
        assert post(url, {"text": "a", "tgt_lang": "de"}).status_code == 200  # an untagged model's own language


def test_host_allow_list(served: ServedModel) -> None:
    with live_server(served, ServeConfig()) as url:
        for host in ("127.0.0.1", "localhost:8000", "[::1]:80"):
            assert httpx.get(f"{url}/health", headers={"Host": host}).status_code == 200, host
        refused = httpx.get(f"{url}/models", headers={"Host": "evil.example:8000"})
        assert refused.status_code == 400 and refused.json()["field"] == "Host"
    with live_server(served, ServeConfig(allowed_hosts=["api.example.org"])) as url:
        assert httpx.get(f"{url}/health", headers={"Host": "api.example.org"}).status_code == 200
        assert httpx.get(f"{url}/health", headers={"Host": "localhost"}).status_code == 400


def test_token(served: ServedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSFORMER_API_KEY", "s3cret")
    with live_server(served, ServeConfig()) as url:
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/ready").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            refused = post(url, {"text": "a"}, **headers)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer", headers
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert post(url, {"text": "a"}, Authorization="Bearer s3cret").status_code == 200
    with live_server(served, ServeConfig(api_key="other")) as url:  # serve.api_key wins over the variable
        assert post(url, {"text": "a"}, Authorization="Bearer other").status_code == 200


def test_cors_is_off_unless_origins_are_given(served: ServedModel) -> None:
    preflight = {"Origin": "https://app.example.org", "Access-Control-Request-Method": "POST"}
    with live_server(served, ServeConfig()) as url:
        answer = httpx.options(f"{url}/translate", headers=preflight)
        assert "access-control-allow-origin" not in answer.headers
        assert "access-control-allow-origin" not in post(url, {"text": "a"}, Origin="https://app.example.org").headers
    with live_server(served, ServeConfig(cors_origins=["https://app.example.org"], api_key="k")) as url:
        answer = httpx.options(
            f"{url}/translate", headers=preflight | {"Access-Control-Request-Headers": "authorization"}
        )
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://app.example.org"
        ok = post(url, {"text": "a"}, Origin="https://app.example.org", Authorization="Bearer k")
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example.org"


def test_blank_lines_stay_empty(served: ServedModel, base: str) -> None:
    texts = ["", "twenty-one", "   "]
    answer = post(base, {"texts": texts}).json()["translations"]
    assert [t["text"] for t in answer] == ["", served.translator.translate("twenty-one"), ""]
    assert answer[0]["hypotheses"] == [{"text": "", "score": 0.0, "log_prob": 0.0}]
    assert served.translator.translate(texts) == [t["text"] for t in answer]  # the Python API agrees


@pytest.mark.slow
def test_blank_lines_stay_empty_in_the_cli(tiny_run: Path, cli, tmp_path: Path) -> None:
    result = cli("decode", f"checkpoint={tiny_run}", "device=cpu", cwd=tmp_path, input="twenty-one\n\nthree\n")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[0] and lines[2], result.stdout


def drain(batcher: Batcher, loop: asyncio.AbstractEventLoop) -> None:
    """Wait (at most 10 s) until the batcher has taken every queued sentence, then stop it."""
    deadline = time.monotonic() + 10
    while batcher.queued() and time.monotonic() < deadline:
        time.sleep(0.01)
    batcher.close()
    loop.close()


def test_small_request_is_not_queued_behind_a_big_one(served: ServedModel) -> None:
    """The batcher takes one sentence of each waiting request in turn: a small request that
    arrives while a big one's first chunk decodes rides in the very next batch."""
    batches: list[list[str]] = []
    first_taken, small_queued = threading.Event(), threading.Event()

    def decode(sentences: list[str], options: DecodeConfig, attention: bool) -> list:
        batches.append(sentences)
        if len(batches) == 1:
            first_taken.set()
            small_queued.wait(10)
        return [[None] for _ in sentences]

    cfg = ServeConfig(max_batch_tokens=4 * 2 * 3, max_wait_ms=0)  # 4 sentences of 3 subwords at beam 2
    batcher = Batcher("m", decode, cfg, lambda *args: None)
    loop = asyncio.new_event_loop()
    options = DecodeConfig(beam_size=2)

    def job(texts: list[str]) -> Job:
        return Job(texts, [3] * len(texts), options, False, loop, loop.create_future())

    batcher.start()
    batcher.submit(job([f"big {i}" for i in range(40)]))
    assert first_taken.wait(10)
    batcher.submit(job(["small"]))
    small_queued.set()
    drain(batcher, loop)
    assert len(batches) == 11 and all(len(b) <= 4 for b in batches)  # the big request in chunks of 4
    assert "small" in batches[1]  # not behind the 9 chunks of the big one still queued


@pytest.fixture(scope="module")
def tagged(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    """A two-step run of the builtin corpus both ways with target-language tags (de, en)."""
    from conftest import compose_config
    from training import QUICK, TINY_MODEL
    from transformer.evaluate import train_and_test as train

    run = tmp_path_factory.mktemp("tagged") / "run"
    overrides = [
        "experiment=builtin_both_ways",
        *TINY_MODEL,
        *QUICK,
        "data.builtin_train=100",
        "data.builtin_valid=10",
        "data.builtin_test=10",
        "data.vocab_size=200",
        "trainer.max_steps=2",
        "evaluate_test=false",
        f"run_dir={run}",
    ]
    train(compose_config("train", overrides))
    return load_served_model("both", str(run), "cpu", DecodeConfig(beam_size=2, tgt_lang="de"))


@pytest.mark.slow
def test_tagged_and_untagged_models_on_one_server(tiny_run: Path, tagged: ServedModel) -> None:
    served = load_served_model("", str(tiny_run), "cpu", DecodeConfig(beam_size=2, tgt_lang="de"))  # ignored by it
    with live_server([served, tagged], ServeConfig()) as url:
        models = {m["name"]: m for m in httpx.get(f"{url}/models").json()["models"]}
        assert models["both"]["target_languages"] == ["de", "en"] and models["en-de"]["target_languages"] == []
        sentence = "three red apples"
        for lang in ("de", "en"):
            answer = post(url, {"text": sentence, "model": "both", "tgt_lang": lang})
            assert answer.status_code == 200, answer.text
            assert answer.json()["translations"][0]["text"] == tagged.translator.translate(sentence, tgt_lang=lang)
        default = post(url, {"text": sentence, "model": "both"}).json()["translations"][0]["text"]
        assert default == tagged.translator.translate(sentence, tgt_lang="de")  # the server's decode.tgt_lang
        refused = post(url, {"text": sentence, "model": "both", "tgt_lang": "fr"})
        assert refused.status_code == 422 and refused.json()["field"] == "tgt_lang" and "de, en" in refused.text
        untagged = post(url, {"text": sentence, "model": "en-de"})  # decode.tgt_lang=de does not tag it
        assert untagged.json()["translations"][0]["text"] == served.translator.translate(sentence)


def test_warns_when_exposed_without_a_token(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One warning line for a non-loopback address without a token (nothing is bound: the
    uvicorn server is replaced)."""
    from transformer.serve import server as server_module
    from transformer.serve.settings import ServeRunConfig

    class Stopped:
        def run(self) -> None:
            pass

    monkeypatch.setattr(server_module, "draining_server", lambda *args: Stopped())
    monkeypatch.delenv("TRANSFORMER_API_KEY", raising=False)
    for host, key, warned in (("0.0.0.0", "", True), ("0.0.0.0", "k", False), ("127.0.0.1", "", False)):
        caplog.clear()
        cfg = ServeRunConfig(checkpoint=str(tiny_run), host=host, device="cpu")
        cfg.serve.decode_process, cfg.serve.api_key = False, key
        with caplog.at_level("WARNING", logger="transformer.serve.server"):
            server_module.serve(cfg)
        lines = [r.getMessage() for r in caplog.records if "without a token" in r.getMessage()]
        assert len(lines) == (1 if warned else 0), (host, key, lines)


def test_without_batching_a_request_is_decoded_whole_and_alone() -> None:
    batches: list[list[str]] = []
    gate = threading.Event()

    def decode(sentences: list[str], options: DecodeConfig, attention: bool) -> list:
        batches.append(sentences)
        gate.wait(10)
        return [[None] for _ in sentences]

    batcher = Batcher("m", decode, ServeConfig(batching=False), lambda *args: None)
    loop = asyncio.new_event_loop()
    jobs = [
        Job(texts, [3] * len(texts), DecodeConfig(), False, loop, loop.create_future())
        for texts in (["a1", "a2"], ["b1", "b2", "b3"], ["c1"])
    ]
    for job in jobs:
        batcher.submit(job)
    batcher.start()
    gate.set()
    drain(batcher, loop)
    assert batches == [["a1", "a2"], ["b1", "b2", "b3"], ["c1"]]
