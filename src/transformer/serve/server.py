"""transformer-serve: load the models, then run uvicorn until SIGTERM or Ctrl-C.

The first signal drains: new requests get 503 while those in flight finish (at most
``serve.drain_timeout_s``), then uvicorn stops; a second signal stops at once.
"""

from __future__ import annotations

import logging
import threading
import time
from importlib.util import find_spec
from types import FrameType
from typing import Any

import torch

from transformer.errors import UserError
from transformer.serve.settings import ServeRunConfig

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


def serve(cfg: ServeRunConfig) -> None:
    if find_spec("fastapi") is None or find_spec("uvicorn") is None:
        raise UserError("transformer-serve needs the serve extra: pip install 'transformer[serve]' (fastapi, uvicorn)")
    import uvicorn

    from transformer.serve.app import create_app
    from transformer.serve.models import load_models
    from transformer.serve.worker import ProcessDecoder

    if cfg.serve.threads > 0:
        torch.set_num_threads(cfg.serve.threads)
    for key in ("max_batch_tokens", "max_sentences", "max_chars", "max_queue", "max_beam_size"):
        if getattr(cfg.serve, key) < 1:
            raise UserError(f"serve.{key}={getattr(cfg.serve, key)} must be >= 1")
    models = load_models(cfg)
    decoders = (
        [ProcessDecoder(m.info["checkpoint"], cfg.device, cfg.decode, cfg.serve.threads) for m in models]
        if cfg.serve.decode_process and cfg.serve.engine == "torch"  # CTranslate2 releases the GIL itself
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
    config = uvicorn.Config(
        app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=cfg.serve.drain_timeout_s
    )
    try:
        draining_server(config, app.state.server, cfg.serve.drain_timeout_s).run()
    finally:
        for decoder in decoders:
            decoder.close()
