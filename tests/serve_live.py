"""Helpers of the server tests: a real uvicorn on 127.0.0.1 (in a thread, with the
connection limits of transformer-serve), /metrics as numbers, bounded waits."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from transformer.serve.app import create_app
from transformer.serve.models import ServedModel
from transformer.serve.server import uvicorn_config
from transformer.serve.settings import ServeConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(served: ServedModel | list[ServedModel], cfg: ServeConfig) -> Iterator[str]:
    """A real uvicorn on 127.0.0.1 in a thread; yields its base URL."""
    port = free_port()
    models = served if isinstance(served, list) else [served]
    server = uvicorn.Server(uvicorn_config(create_app(models, cfg), "127.0.0.1", port, cfg))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def metrics(base: str, **headers: str) -> dict[str, float]:
    """/metrics as {sample with labels: value}."""
    text = httpx.get(f"{base}/metrics", headers=headers).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection; everything the server answers until it closes
    (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        answer = b""
        try:
            s.sendall(data)
        except OSError:  # the server answered (and closed) before reading everything
            pass
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except OSError:  # a timeout, or a reset after the answer
            pass
        return answer


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response (headers and a Content-Length body) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-body: {data!r}"
        body += chunk
    return head + b"\r\n\r\n" + body
