"""POST /translate: the request fields, their checks (each failure an ``ApiError`` with its
HTTP status and the field it names) and the shape of the answer."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from transformer.config import DecodeConfig
from transformer.decode.alignment import pharaoh
from transformer.decode.translator import Translation, Translator, check_decode_config
from transformer.errors import UserError
from transformer.serve.settings import ServeConfig

DECODE_FIELDS = ("beam_size", "n_best", "length_penalty", "sampling", "temperature", "top_k", "top_p")


class ApiError(Exception):
    """A request the server refuses: answered ``{"error": message, "field": field}``."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


class TranslateRequest(BaseModel):
    """The body of POST /translate; decode fields left out take the server's defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str | None = None  # one sentence
    texts: list[str] | None = None  # or several, answered in this order
    model: str | None = None  # a name from GET /models (default: the first)
    beam_size: int | None = Field(None, ge=1)
    n_best: int | None = Field(None, ge=1)
    length_penalty: float | None = Field(None, allow_inf_nan=False)
    sampling: bool | None = None
    temperature: float | None = Field(None, gt=0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    scores: bool = True  # include score and log_prob
    alignment: bool = False  # include each hypothesis' source-target cross-attention

    @property
    def sentences(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


def max_body_bytes(cfg: ServeConfig) -> int:
    """The largest body a request within the limits can have (every character \\u-escaped)."""
    return cfg.max_sentences * (6 * cfg.max_chars + 16) + 65536


def parse_request(body: bytes, cfg: ServeConfig) -> TranslateRequest:
    """The checked request: 400 for bytes that are not UTF-8 JSON, 422 for wrong fields,
    413 past the limits."""
    if len(body) > max_body_bytes(cfg):
        raise ApiError(
            413, f"request body of {len(body)} bytes is larger than serve.max_sentences x serve.max_chars allow"
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not UTF-8 (invalid byte at offset {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise ApiError(422, 'request body must be a JSON object such as {"text": "..."}')
    try:
        request = TranslateRequest.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ApiError(422, f"{where}: {error['msg']}", field=where) from None
    check_limits(request, cfg)
    return request


def check_limits(request: TranslateRequest, cfg: ServeConfig) -> None:
    if (request.text is None) == (request.texts is None):
        raise ApiError(
            422, "give text (one sentence) or texts (a list of sentences), not both or neither", field="text"
        )
    sentences = request.sentences
    if not sentences:
        raise ApiError(422, "texts is empty", field="texts")
    if len(sentences) > cfg.max_sentences:
        raise ApiError(
            413,
            f"texts holds {len(sentences)} sentences; at most serve.max_sentences={cfg.max_sentences} per request",
            field="texts",
        )
    for i, sentence in enumerate(sentences):
        if len(sentence) > cfg.max_chars:
            where = "text" if request.text is not None else f"texts.{i}"
            raise ApiError(
                413, f"{where} has {len(sentence)} characters; at most serve.max_chars={cfg.max_chars}", field=where
            )
    for key in ("beam_size", "n_best"):
        value = getattr(request, key)
        if value is not None and value > cfg.max_beam_size:
            raise ApiError(422, f"{key}={value}: at most serve.max_beam_size={cfg.max_beam_size}", field=key)


def decode_options(translator: Translator, request: TranslateRequest) -> DecodeConfig:
    """The server's decode defaults with the request's decode fields (``alignment`` also asks
    the search for word alignments)."""
    fields = {k: getattr(request, k) for k in DECODE_FIELDS if getattr(request, k) is not None}
    try:
        options = translator.options(**fields, **({"alignment": True} if request.alignment else {}))
        check_decode_config(options)
    except UserError as e:
        raise ApiError(
            422, str(e).removeprefix("decode."), field=str(e).removeprefix("decode.").split("=")[0]
        ) from None
    return options


def alignment_of(source_pieces: list[str], hypothesis: Translation) -> dict[str, Any]:
    """Source and target pieces, the cross-attention (target x source, mean over layers and
    heads), Pharaoh pairs ``i-j``: for each target piece j, the source piece i it attends most,
    and ``words``: the search's word alignment (decode.alignment_layer, see decode.alignment)."""
    weights = hypothesis.attention  # (T, S)
    pairs = " ".join(f"{i}-{j}" for j, i in enumerate(weights.argmax(dim=1).tolist()))
    return {
        "source": source_pieces[: weights.shape[1]],
        "target": hypothesis.tokens,
        "weights": [[round(w, 4) for w in row] for row in weights.tolist()],
        "pairs": pairs,
        "words": pharaoh(hypothesis.alignment or []),
    }


def answer_body(
    name: str, request: TranslateRequest, results: list[list[Translation]], source_pieces: list[list[str]]
) -> dict[str, Any]:
    """One entry per input sentence, in input order: the best text and the n-best list."""

    def hypothesis(h: Translation, pieces: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"text": h.text}
        if request.scores:
            out |= {"score": round(h.score, 4), "log_prob": round(h.log_prob, 4)}
        if request.alignment:
            out["alignment"] = alignment_of(pieces, h)
        return out

    translations = []
    for hyps, pieces in zip(results, source_pieces):
        listed = [hypothesis(h, pieces) for h in hyps]
        best = {k: v for k, v in listed[0].items() if k in ("text", "score")}
        translations.append(best | {"hypotheses": listed})
    return {"model": name, "translations": translations}
