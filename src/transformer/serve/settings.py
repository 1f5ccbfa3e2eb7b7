"""The schema of ``transformer-serve key=value ...`` (checked like the other commands)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

from transformer.config import Checked, DecodeConfig

USAGE = """usage: transformer-serve checkpoint=RUN_DIR_OR_PT | models={en-de: RUN1, de-en: RUN2} [host=127.0.0.1 port=8000 device=auto decode.KEY=.. serve.KEY=..]

  serve.batching=true          decode sentences of concurrent requests together (false: one request at a time)
  serve.max_batch_tokens=8192  source subwords x beam_size per batch the worker collects
  serve.max_wait_ms=10         how long the worker waits for more sentences once it holds one
  serve.max_sentences=64       sentences per request (more: 413)
  serve.max_chars=1000         characters per sentence (more: 413)
  serve.max_request_cost=4096  sentences x beam_size x n_best per request (more: 413)
  serve.max_queue=512          sentences admitted and not yet answered, per model (more: 429)
  serve.api_key=TOKEN          require "Authorization: Bearer TOKEN" (or set TRANSFORMER_API_KEY)
  serve.allowed_hosts=[a,b]    Host names accepted (default: loopback names on a loopback address)
  serve.cors_origins=[url]     origins a browser may call from (default: none)
  serve.batch_timeout_s=60     a batch running longer: the worker is killed and restarted (503)
  serve.worker_max_rss_mb=0    restart the worker between batches past this memory (0: no limit)
  serve.engine=torch           or ctranslate2: search with CTranslate2 (a conversion cached beside the checkpoint)
  decode.KEY=VALUE             defaults of the search (beam_size, n_best, length_penalty, ...)
See docs/serving.md."""


class Engine(StrEnum):
    torch = "torch"
    ctranslate2 = "ctranslate2"


@dataclass
class ServeConfig(Checked):
    """Batching and limits of the server (their ranges: config.RANGES["serve"])."""

    section: ClassVar[str] = "serve"  # not a key: the prefix of this section's keys in error lines

    batching: bool = True  # false: the worker decodes one request at a time (the baseline of scripts/bench_serve.py)
    # source subwords x beam_size (x n_best when sampling) per batch the worker collects across requests
    max_batch_tokens: int = 8192
    max_wait_ms: float = 10.0  # once the worker holds a sentence, how long it waits for more to fill the batch
    max_sentences: int = 64  # sentences per request; more is answered 413
    max_chars: int = 1000  # characters per sentence; longer is answered 413
    max_queue: int = 512  # sentences admitted and not yet answered, per model; more is answered 429
    max_beam_size: int = 16  # largest beam_size (and n_best) a request may ask for; more is answered 422
    max_request_cost: int = (
        4096  # sentences x beam_size x n_best of one request (sampling: x n_best x n_best); more: 413
    )
    max_attention_cells: int = (
        1_000_000  # "attention": true: most matrix cells (target x source, all hypotheses); more: 413
    )
    retry_after_s: int = 1  # the Retry-After header of a 429
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may take before the server stops anyway
    threads: int = 0  # torch intra-op threads of the decoding, set once at start (0: PyTorch's default)
    # decode in a child process per model, so the search does not hold the event loop's GIL (false: a thread)
    decode_process: bool = True
    batch_timeout_s: float = 60.0  # a batch decoding longer: the worker counts as hung, is killed and restarted (503)
    restart_backoff_s: float = 1.0  # wait before restarting a worker that failed again (doubles, at most 32x)
    worker_max_rss_mb: int = 0  # restart the decoding process between batches once it holds more memory (0: no limit)
    header_timeout_s: float = 10.0  # a connection must send a request's headers within this time, or is closed
    body_timeout_s: float = 30.0  # a request's body must arrive whole within this time, or is answered 408
    keep_alive_s: int = 5  # idle keep-alive connections are closed after this many seconds
    max_connections: int = 256  # open connections (and requests) at once; more are answered 503
    max_header_bytes: int = 16384  # request line and headers; larger is answered 400
    api_key: str = ""  # require "Authorization: Bearer <key>" (empty: the TRANSFORMER_API_KEY variable, else none)
    # Host header values accepted, e.g. [api.example.com] (empty: loopback names on a loopback address, any otherwise)
    allowed_hosts: list[str] = field(default_factory=list)
    cors_origins: list[str] = field(
        default_factory=list
    )  # origins browsers may call from, e.g. [https://x.org] (empty: none)
    # torch | ctranslate2: search in CTranslate2 on a conversion cached beside the checkpoint (docs/fast-decoding.md)
    engine: Engine = Engine.torch


@dataclass
class ServeRunConfig:
    """transformer-serve: the models to load, where to listen, decode defaults, batching."""

    checkpoint: str | None = None  # one checkpoint file or run directory (served under its languages' name, e.g. en-de)
    models: dict[str, str] = field(default_factory=dict)  # or several by name: {en-de: RUN1, de-en: RUN2}
    host: str = "127.0.0.1"  # address to listen on (0.0.0.0 exposes the server to the network)
    port: int = 8000  # TCP port
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    decode: DecodeConfig = field(default_factory=DecodeConfig)  # decode defaults; a request may override some
    serve: ServeConfig = field(default_factory=ServeConfig)  # batching and limits
    log_level: str = "info"  # uvicorn's log level (warning: no access log)
