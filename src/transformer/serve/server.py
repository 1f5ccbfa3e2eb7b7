"""transformer-serve: load the models, then run uvicorn until SIGTERM or Ctrl-C.

The first signal drains: new requests get 503 while those in flight finish (at most
``serve.drain_timeout_s``), then uvicorn stops; a second signal stops at once. Connections
are bounded: a cap on their number, the idle keep-alive time, the size of the headers and
the time a client may take to send them (``guarded_protocol``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from importlib.util import find_spec
from types import FrameType
from typing import Any

import torch

from transformer.config import validate
from transformer.errors import UserError
from transformer.serve.settings import ServeConfig, ServeRunConfig

log = logging.getLogger(__name__)


def draining_server(config: Any, state: Any, timeout_s: float) -> Any:
    """A ``uvicorn.Server`` whose first exit signal drains ``state`` before stopping."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if state.draining:
                return super().handle_exit(sig, frame)
            state.draining = True
            log.info("signal %d: draining %d request(s) in flight; new ones get 503", sig, state.in_flight)
            threading.Thread(target=self.stop_when_drained, args=(sig,), daemon=True).start()

        def stop_when_drained(self, sig: int) -> None:
            deadline = time.monotonic() + timeout_s
            while state.in_flight > 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            super().handle_exit(sig, None)

    return DrainingServer(config)


def guarded_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request line
    and headers within ``header_timeout_s`` of connecting or of sending its first byte after
    a keep-alive pause (a slow-headers client holds no connection for long)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        header_timer: Any = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self.disarm_header_timer()  # the headers are in: the body has serve.body_timeout_s
            elif self.header_timer is None and not self.transport.is_closing():
                self.arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm_header_timer()
            super().connection_lost(exc)

        def arm_header_timer(self) -> None:
            self.header_timer = self.loop.call_later(header_timeout_s, self.headers_too_slow)

        def disarm_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def headers_too_slow(self) -> None:
            self.header_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(app: Any, host: str, port: int, cfg: ServeConfig, log_level: str = "warning") -> Any:
    """uvicorn's settings for ``app`` with the connection limits of ``cfg``."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=guarded_protocol(cfg.header_timeout_s),
        limit_concurrency=cfg.max_connections,
        timeout_keep_alive=cfg.keep_alive_s,
        h11_max_incomplete_event_size=cfg.max_header_bytes,
        timeout_graceful_shutdown=int(cfg.drain_timeout_s),
    )


def check_address(host: str, port: int) -> None:
    """Bind ``host:port`` once and let go, so an unknown name, an address this machine does not
    have or a port in use is one error line before any model is loaded, not after."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as e:
        raise UserError(f"host={host!r}: cannot resolve it ({e.strerror or e})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            raise UserError(f"host={host!r} port={port}: cannot listen there ({e.strerror or e})") from None


def serve(cfg: ServeRunConfig) -> None:
    if find_spec("fastapi") is None or find_spec("uvicorn") is None:
        raise UserError("transformer-serve needs the serve extra: pip install 'transformer[serve]' (fastapi, uvicorn)")
    from transformer.serve.app import create_app
    from transformer.serve.guard import api_key, is_loopback
    from transformer.serve.models import decodes_in_worker, load_models
    from transformer.serve.worker import ProcessDecoder

    validate(cfg, ("", "serve"))  # port and the serve limits (config.RANGES)
    check_address(cfg.host, cfg.port)
    if cfg.serve.threads > 0:
        torch.set_num_threads(cfg.serve.threads)
    in_worker = decodes_in_worker(cfg)
    models = load_models(cfg, weights=not in_worker)  # the weights are loaded once, in each model's worker
    decoders = (
        [ProcessDecoder(m.info["checkpoint"], cfg.device, cfg.decode, cfg.serve.threads, cfg.serve) for m in models]
        if in_worker
        else []
    )
    for model, decoder in zip(models, decoders):
        model.decoder = decoder
    app = create_app(models, cfg.serve)
    log.info(
        "serving %s on http://%s:%d (batching %s)",
        ", ".join(app.state.server.models),
        cfg.host,
        cfg.port,
        "on" if cfg.serve.batching else "off",
    )
    if not is_loopback(cfg.host) and not api_key(cfg.serve):
        log.warning(
            "listening on %s without a token: anyone who reaches the port can translate (set serve.api_key)", cfg.host
        )
    config = uvicorn_config(app, cfg.host, cfg.port, cfg.serve, cfg.log_level)
    try:
        draining_server(config, app.state.server, cfg.serve.drain_timeout_s).run()
    finally:
        for decoder in decoders:
            decoder.close()
