"""Who may call the server and what it reads of them, checked before any other work: the
Host allow-list (against DNS rebinding), the bearer token, and the request body (JSON only,
refused on its Content-Length before it is read, read with a size cap and a deadline)."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import os

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from transformer.serve.api import ApiError
from transformer.serve.settings import ServeConfig

API_KEY_VARIABLE = "TRANSFORMER_API_KEY"
OPEN_PATHS = ("/health", "/ready")  # probes answer without the token
CLOSE = {"Connection": "close"}  # a body left unread: the connection cannot carry another request


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1), with or without brackets."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The name part of a Host header (``[::1]:8000`` -> ``::1``, ``a.org:80`` -> ``a.org``)."""
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def api_key(cfg: ServeConfig) -> str:
    """The token requests must carry: serve.api_key, else $TRANSFORMER_API_KEY ("" for none)."""
    return cfg.api_key or os.environ.get(API_KEY_VARIABLE, "")


class Guard:
    """ASGI middleware: 431 for headers over serve.max_header_bytes (h11 refuses them only
    while they arrive in pieces), 400 for a Host outside the allow-list (default: loopback
    names on a loopback address, any name otherwise), 401 without the bearer token (when one
    is set)."""

    def __init__(self, app: ASGIApp, cfg: ServeConfig):
        self.app, self.hosts, self.key = app, [h.lower() for h in cfg.allowed_hosts], api_key(cfg).encode()
        self.max_header_bytes = cfg.max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > self.max_header_bytes:
            too_big = JSONResponse(
                {"error": f"request headers larger than serve.max_header_bytes={self.max_header_bytes}"},
                status_code=431,
                headers=CLOSE,
            )
            return await too_big(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.host_refusal(scope, headers.get("host", "")) or self.token_refusal(scope["path"], headers)
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def host_refusal(self, scope: Scope, host: str) -> JSONResponse | None:
        name = host_name(host).lower()
        if self.hosts:
            allowed = "*" in self.hosts or name in self.hosts
        else:
            local = (scope.get("server") or ("", 0))[0] or ""
            allowed = not is_loopback(local) or is_loopback(name)
        if allowed:
            return None
        return JSONResponse(
            {"error": f"Host {host!r} is not allowed (serve.allowed_hosts)", "field": "Host"},
            status_code=400,
            headers=CLOSE,
        )

    def token_refusal(self, path: str, headers: dict[str, str]) -> JSONResponse | None:
        if not self.key or path in OPEN_PATHS or path == "/":
            return None
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.key):
            return None
        return JSONResponse(
            {"error": "missing or wrong token: send the header Authorization: Bearer <serve.api_key>"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The JSON body: 415 for another Content-Type, 413 when its Content-Length passes
    ``limit`` (before reading) or once the bytes read do, 408 unless it is whole within
    ``timeout_s``."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, not {content_type or 'missing'!r}", headers=CLOSE)
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        status = 413 if declared.isdigit() else 400
        raise ApiError(
            status,
            f"Content-Length {declared}: at most {limit} bytes (serve.max_sentences x serve.max_chars)",
            headers=CLOSE,
        )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(anext(stream), max(deadline - loop.time(), 0))
        except StopAsyncIteration:
            return b"".join(chunks)
        except TimeoutError:
            raise ApiError(
                408, f"request body not received within serve.body_timeout_s={timeout_s:g}", headers=CLOSE
            ) from None
        except ClientDisconnect:
            raise ApiError(499, "the client closed the connection while sending its body") from None
        size += len(chunk)
        if size > limit:
            raise ApiError(
                413, f"request body passed {limit} bytes (serve.max_sentences x serve.max_chars)", headers=CLOSE
            )
        chunks.append(chunk)
