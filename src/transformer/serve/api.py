"""POST /translate: the request fields, their checks (each failure an ``ApiError`` with its
HTTP status and the field it names) and the shape of the answer."""

from __future__ import annotations

import json
import re
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from transformer.config import DecodeConfig
from transformer.data.multilingual import tag_prefix
from transformer.decode.alignment import pharaoh
from transformer.decode.rules import max_lengths
from transformer.decode.spec import check_decode_config
from transformer.decode.translator import Translation, Translator
from transformer.errors import UserError
from transformer.serve.settings import ServeConfig

DECODE_FIELDS = ("beam_size", "n_best", "length_penalty", "sampling", "temperature", "top_k", "top_p")
MAX_JSON_DEPTH = 8  # a request is an object holding lists of strings: anything deeper is refused before parsing
STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


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
    # ranges a float32 search computes without overflow (wider values are no different in effect)
    length_penalty: float | None = Field(None, ge=-10, le=10, allow_inf_nan=False)
    sampling: bool | None = None
    temperature: float | None = Field(None, ge=0.01, le=100, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=1e-6, le=1, allow_inf_nan=False)
    tgt_lang: str | None = None  # a multilingual (tagged) model's target language
    scores: bool = True  # include score and log_prob
    alignment: bool = False  # include each hypothesis' pieces and word alignment (Pharaoh links)
    attention: bool = False  # also the full cross-attention matrix (within serve.max_attention_cells)

    @property
    def sentences(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


def max_body_bytes(cfg: ServeConfig) -> int:
    """The largest body a request within the limits can have (every character \\u-escaped)."""
    return cfg.max_sentences * (6 * cfg.max_chars + 16) + 65536


def parse_request(body: bytes, cfg: ServeConfig) -> TranslateRequest:
    """The checked request: 400 for bytes that are not UTF-8 JSON (or nested too deep), 422
    for wrong fields, 413 past the limits."""
    if len(body) > max_body_bytes(cfg):
        raise ApiError(
            413, f"request body of {len(body)} bytes is larger than serve.max_sentences x serve.max_chars allow"
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not UTF-8 (invalid byte at offset {e.start})") from None
    check_depth(text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        raise ApiError(400, f"request body is not usable JSON: {e}") from None
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


def check_depth(text: str) -> None:
    """400 for JSON nested deeper than a request can be, before the parser recurses into it."""
    depth = 0
    for match in STRING_OR_BRACKET.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ApiError(400, f"request body is JSON nested deeper than {MAX_JSON_DEPTH} levels")
        elif token in "]}":
            depth -= 1


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
        where = "text" if request.text is not None else f"texts.{i}"
        if len(sentence) > cfg.max_chars:
            raise ApiError(
                413, f"{where} has {len(sentence)} characters; at most serve.max_chars={cfg.max_chars}", field=where
            )
        if not sentence.isascii():
            try:
                sentence.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON's \ud800 escapes: no text to translate
                raise ApiError(422, f"{where} holds a lone surrogate at character {e.start}", field=where) from None
    for key in ("beam_size", "n_best"):
        value = getattr(request, key)
        if value is not None and value > cfg.max_beam_size:
            raise ApiError(422, f"{key}={value}: at most serve.max_beam_size={cfg.max_beam_size}", field=key)


def decode_options(translator: Translator, request: TranslateRequest, target_language: str | None) -> DecodeConfig:
    """The server's decode defaults with the request's decode fields (``alignment`` also asks
    the search for word alignments); 422 naming the field for a value out of range or an
    n_best larger than the beam (``check_decode_config``, as the CLI's error line). An
    untagged model takes ``tgt_lang`` only when it names its own target language."""
    fields = {k: getattr(request, k) for k in DECODE_FIELDS if getattr(request, k) is not None}
    fields["tgt_lang"] = target_lang(translator, request.tgt_lang, target_language)
    try:
        options = translator.options(
            **fields, **({"alignment": True} if request.alignment or request.attention else {})
        )
        check_decode_config(options)
    except UserError as e:
        raise ApiError(
            422, str(e).removeprefix("decode."), field=str(e).removeprefix("decode.").split("=")[0]
        ) from None
    return options


def target_lang(translator: Translator, asked: str | None, target_language: str | None) -> str | None:
    """The tag language of the search: the request's, else the server's default (None for an
    untagged model)."""
    tokenizer = translator.tokenizer
    if not tokenizer.tags:
        if asked is not None and asked != target_language:
            raise ApiError(
                422,
                f"tgt_lang={asked!r}: this model translates only into {target_language or 'one language'}",
                field="tgt_lang",
            )
        return None
    chosen = asked if asked is not None else translator.config.tgt_lang
    try:
        tag_prefix(tokenizer, chosen, key="tgt_lang")
    except UserError as e:
        raise ApiError(422, str(e), field="tgt_lang") from None
    return chosen


def check_cost(
    request: TranslateRequest, options: DecodeConfig, lengths: list[int], max_positions: int, cfg: ServeConfig
) -> None:
    """413 for a request whose search or answer would pass the limits: sentences x search rows
    x n_best (serve.max_request_cost), and with ``attention`` the matrices' cells at the
    longest outputs the search allows (serve.max_attention_cells)."""
    rows = options.n_best if options.sampling else options.beam_size
    cost = len(lengths) * rows * options.n_best
    if cost > cfg.max_request_cost:
        raise ApiError(
            413,
            f"{len(lengths)} sentence(s) x {'n_best' if options.sampling else 'beam_size'} {rows} "
            f"x n_best {options.n_best} = {cost}: at most serve.max_request_cost={cfg.max_request_cost} "
            "per request; send fewer sentences or a smaller beam",
            field="texts" if request.texts is not None else "beam_size",
        )
    if request.attention:
        sources = torch.tensor(lengths)
        targets = max_lengths(sources, options.max_len_a, options.max_len_b, max_positions - 1)
        cells = int((sources.clamp(max=max_positions) * targets).sum()) * options.n_best
        if cells > cfg.max_attention_cells:
            raise ApiError(
                413,
                f"attention matrices of up to {cells} cells: "
                f"at most serve.max_attention_cells={cfg.max_attention_cells}; "
                "ask for alignment (word links) instead, or fewer sentences",
                field="attention",
            )


def alignment_of(source_pieces: list[str], hypothesis: Translation) -> dict[str, Any]:
    """Source and target pieces and ``words``: the search's word alignment (Pharaoh ``i-j``,
    decode.alignment_layer, see decode.alignment). With the attention matrix: ``weights``
    (target x source, mean over layers and heads) and ``pairs``: for each target piece j, the
    source piece i it attends most."""
    out: dict[str, Any] = {
        "source": source_pieces,
        "target": hypothesis.tokens,
        "words": pharaoh(hypothesis.alignment or []),
    }
    weights = hypothesis.attention  # (T, S)
    if weights is not None:
        out["source"] = source_pieces[: weights.shape[1]]
        out["weights"] = [[round(w, 4) for w in row] for row in weights.tolist()]
        out["pairs"] = " ".join(f"{i}-{j}" for j, i in enumerate(weights.argmax(dim=1).tolist()))
    return out


def answer_body(
    name: str, request: TranslateRequest, results: list[list[Translation]], source_pieces: list[list[str]]
) -> dict[str, Any]:
    """One entry per input sentence, in input order: the best text and the n-best list."""

    def hypothesis(h: Translation, pieces: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"text": h.text}
        if request.scores:
            out |= {"score": round(h.score, 4), "log_prob": round(h.log_prob, 4)}
        if request.alignment or request.attention:
            out["alignment"] = alignment_of(pieces, h)
        return out

    translations = []
    for hyps, pieces in zip(results, source_pieces):
        listed = [hypothesis(h, pieces) for h in hyps]
        best = {k: v for k, v in listed[0].items() if k in ("text", "score")}
        translations.append(best | {"hypotheses": listed})
    return {"model": name, "translations": translations}
