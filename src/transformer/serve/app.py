"""The FastAPI application: routes, JSON errors, the draining gate and the demo page.

``create_app`` takes models already loaded (tests and several apps share them) and starts
one decoding worker per model in the app's lifespan. ``/health`` says the process answers;
``/ready`` says every model can decode now (false while a decoding process restarts or the
server drains).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from transformer.errors import first_line
from transformer.serve.api import ApiError, answer_body, check_cost, decode_options, max_body_bytes, parse_request
from transformer.serve.batcher import Batcher, Item, Job
from transformer.serve.guard import Guard, read_body
from transformer.serve.metrics import ServeMetrics
from transformer.serve.models import ServedModel
from transformer.serve.settings import ServeConfig

log = logging.getLogger(__name__)

ROUTES = ("/", "/health", "/ready", "/models", "/metrics", "/translate")


class ServerState:
    """Models, their batchers, metrics, and whether the server is draining for a shutdown."""

    def __init__(self, models: list[ServedModel], cfg: ServeConfig):
        self.models = {m.name: m for m in models}
        self.cfg = cfg
        self.draining = False  # set on SIGTERM: new requests get 503, in-flight ones finish
        self.in_flight = 0  # requests being answered (the event loop's thread only)
        self.batchers = {
            m.name: Batcher(m.name, m.decode, cfg, self.batch_hook(m.name), m.decoder, self.restart_hook(m.name))
            for m in models
        }
        self.metrics = ServeMetrics(
            {
                "transformer_serve_queue_sentences": (
                    "sentences waiting for the decoding worker",
                    lambda: self.per_model(Batcher.queued),
                ),
                "transformer_serve_pending_sentences": (
                    "sentences admitted and not yet answered (limit: serve.max_queue)",
                    lambda: self.per_model(lambda b: b.pending),
                ),
                "transformer_serve_in_flight_requests": ("requests being answered", lambda: {(): self.in_flight}),
                "transformer_serve_draining": (
                    "1 once a SIGTERM asked the server to stop",
                    lambda: {(): int(self.draining)},
                ),
                "transformer_serve_ready": (
                    "1 while the model can decode (0: its decoding process is restarting or cannot start)",
                    lambda: self.per_model(lambda b: int(b.ready)),
                ),
            }
        )

    def per_model(self, read: Any) -> dict:
        return {(("model", name),): read(b) for name, b in self.batchers.items()}

    def batch_hook(self, name: str) -> Any:
        def record(items: list[Item], results: list, seconds: float) -> None:
            self.metrics.batch(
                name,
                [i.length for i in items],
                len({id(i.job) for i in items}),
                [len(h[0].tokens) for h in results],
                seconds,
            )

        return record

    def restart_hook(self, name: str) -> Any:
        return lambda reason: self.metrics.restarts.inc(model=name, reason=reason)

    def readiness(self) -> tuple[bool, dict[str, bool]]:
        """Whether every model can decode now (never while draining), and each model's state."""
        models = {name: b.ready for name, b in self.batchers.items()}
        return not self.draining and all(models.values()), models

    def model(self, name: str | None) -> ServedModel:
        if name is None:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise ApiError(404, f"unknown model {name!r}; served: {', '.join(self.models)}", field="model")
        return self.models[name]


class Gate:
    """ASGI middleware: counts requests by path and status and those in flight; once
    draining, answers everything but /metrics with 503."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in ROUTES else "other"
        if self.state.draining and path != "/metrics":
            self.state.metrics.requests.inc(path=path, code="503")
            refusal = JSONResponse(
                {"error": "the server is shutting down"}, status_code=503, headers={"Connection": "close"}
            )
            return await refusal(scope, receive, send)
        status = [500]

        async def send_noting_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            self.state.in_flight -= 1
            self.state.metrics.requests.inc(path=path, code=str(status[0]))


async def answer_or_disconnect(request: Request, future: asyncio.Future) -> Any | None:
    """The future's result, or None when the client disconnects first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({future, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    return future.result() if future in done else None


async def translate(state: ServerState, request: Request) -> Response:
    """POST /translate: read and check, queue for the model's worker, wait, answer in input order."""
    started = time.perf_counter()
    cfg = state.cfg
    body = parse_request(await read_body(request, max_body_bytes(cfg), cfg.body_timeout_s), cfg)
    served = state.model(body.model)
    translator = served.translator
    options = decode_options(translator, body, served.info.get("target_language"))
    sentences = body.sentences
    tag = 1 if options.tgt_lang is not None else 0  # a tagged source starts with its <2xx>
    lengths = [len(ids) + tag for ids in translator.tokenizer.encode_src(sentences)]
    check_cost(body, options, lengths, translator.models[0].cfg.max_positions, cfg)
    loop = asyncio.get_running_loop()
    job = Job(sentences, lengths, options, body.attention, loop, loop.create_future())
    batcher = state.batchers[served.name]
    batcher.submit(job)
    try:
        results = await answer_or_disconnect(request, job.future)
    finally:
        if not job.future.done():
            batcher.cancel(job)
            state.metrics.cancelled.inc(model=served.name)
        batcher.release(job)
    if results is None:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    pieces = [translator.tokenizer.src_pieces(s) if body.alignment or body.attention else [] for s in sentences]
    answer = answer_body(served.name, body, results, pieces)
    state.metrics.latency.observe(time.perf_counter() - started, model=served.name)
    return JSONResponse(answer)


def add_error_handlers(app: FastAPI) -> None:
    """Every error is a JSON body ``{"error": ...}``; a failure inside one request is a 500
    for that request only."""

    @app.exception_handler(ApiError)
    async def refused(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(
            {"error": e.message} | ({"field": e.field} if e.field else {}), status_code=e.status, headers=e.headers
        )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.error("request %s %s failed", request.method, request.url.path, exc_info=e)
        return JSONResponse({"error": f"internal error: {first_line(e)}"}, status_code=500)


def create_app(models: list[ServedModel], cfg: ServeConfig) -> FastAPI:
    """The application over loaded models (the first is the default)."""
    state = ServerState(models, cfg)
    page = resources.files("transformer.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for batcher in state.batchers.values():
            batcher.start()
        yield
        for batcher in state.batchers.values():
            batcher.close()

    app = FastAPI(title="transformer-serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    app.add_middleware(Guard, cfg=cfg)  # the innermost: after the gate has counted the request
    app.add_middleware(Gate, state=state)
    if cfg.cors_origins:  # the outermost: a browser's preflight carries no token
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cfg.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    add_error_handlers(app)
    app.add_api_route("/", lambda: HTMLResponse(page), methods=["GET"], include_in_schema=False)
    app.add_api_route("/health", lambda: {"status": "ok", "models": list(state.models)}, methods=["GET"])

    def ready() -> JSONResponse:
        ok, models = state.readiness()
        return JSONResponse({"ready": ok, "models": models}, status_code=200 if ok else 503)

    app.add_api_route("/ready", ready, methods=["GET"])
    app.add_api_route("/models", lambda: {"models": [m.info for m in state.models.values()]}, methods=["GET"])
    app.add_api_route(
        "/metrics",
        lambda: PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4"),
        methods=["GET"],
    )

    async def translate_route(request: Request) -> Response:
        return await translate(state, request)

    app.add_api_route("/translate", translate_route, methods=["POST"])
    return app
