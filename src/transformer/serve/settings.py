"""The schema of ``transformer-serve key=value ...`` (checked like the other commands)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformer.config import DecodeConfig

USAGE = """usage: transformer-serve checkpoint=RUN_DIR_OR_PT | models={en-de: RUN1, de-en: RUN2} [host=127.0.0.1 port=8000 device=auto decode.KEY=.. serve.KEY=..]

  serve.batching=true          decode sentences of concurrent requests together (false: one request at a time)
  serve.max_batch_tokens=2048  source subwords per batch the worker collects
  serve.max_wait_ms=10         how long the worker waits for more sentences once it holds one
  serve.max_sentences=64       sentences per request (more: 413)
  serve.max_chars=1000         characters per sentence (more: 413)
  serve.max_queue=512          sentences admitted and not yet answered, per model (more: 429)
  serve.engine=torch           or ctranslate2: search with CTranslate2 (a conversion cached beside the checkpoint)
  decode.KEY=VALUE             defaults of the search (beam_size, n_best, length_penalty, ...)
See README.md, section Serve."""


@dataclass
class ServeConfig:
    """Batching and limits of the server."""

    batching: bool = True  # false: the worker decodes one request at a time (the baseline of scripts/bench_serve.py)
    max_batch_tokens: int = 2048  # source subwords per batch the worker collects across requests
    max_wait_ms: float = 10.0  # once the worker holds a sentence, how long it waits for more to fill the batch
    max_sentences: int = 64  # sentences per request; more is answered 413
    max_chars: int = 1000  # characters per sentence; longer is answered 413
    max_queue: int = 512  # sentences admitted and not yet answered, per model; more is answered 429
    max_beam_size: int = 16  # largest beam_size (and n_best) a request may ask for; more is answered 422
    retry_after_s: int = 1  # the Retry-After header of a 429
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may take before the server stops anyway
    threads: int = 0  # torch intra-op threads of the decoding, set once at start (0: PyTorch's default)
    # decode in a child process per model, so the search does not hold the event loop's GIL (false: a thread)
    decode_process: bool = True
    # torch | ctranslate2: search in CTranslate2 on a conversion cached beside the checkpoint (docs/fast-decoding.md)
    engine: str = "torch"


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
