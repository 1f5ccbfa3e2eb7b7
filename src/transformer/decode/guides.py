"""Guided decoding's inputs, checked before any search starts: forced target prefixes and
lexical constraint phrases, as target ids, from the API's arguments or from
decode.prefix_file / decode.constraints_file (one line per input line)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch

from transformer.config import DecodeConfig
from transformer.data.corpus import open_text
from transformer.data.tokenizer import Tokenizer
from transformer.decode.rules import max_lengths
from transformer.errors import UserError


def check_prefixes(
    src_ids: Sequence[list[int]], prefixes: Sequence[list[int]], cfg: DecodeConfig, limit: int, first_line: int
) -> None:
    """A forced prefix must leave room for EOS within its line's output limit: one error
    line naming the input line (cutting the prefix would silently break its promise)."""
    longest = max_lengths(torch.tensor([len(s) for s in src_ids]), cfg.max_len_a, cfg.max_len_b, limit - 1)
    for i, (prefix, most) in enumerate(zip(prefixes, longest.tolist())):
        if len(prefix) >= most:
            raise UserError(
                f"input line {first_line + i}: its forced prefix has {len(prefix)} subwords, but the line's output is "
                f"limited to {most} with EOS (decode.max_len_a, decode.max_len_b): shorten the prefix or raise the limit"
            )


def check_guides(
    src_ids: Sequence[list[int]],
    prefixes: Sequence[list[int]] | None,
    constraints: Sequence[list[list[int]]] | None,
    cfg: DecodeConfig,
    limit: int,
    first_line: int,
) -> None:
    """Prefixes and constraints fit the sources and the search before any search starts."""
    for name, guide in (("prefixes", prefixes), ("constraint lists", constraints)):
        if guide is not None and len(guide) != len(src_ids):
            raise UserError(f"{len(guide)} {name} for {len(src_ids)} sentences: give one per sentence")
    if prefixes is not None:
        check_prefixes(src_ids, prefixes, cfg, limit, first_line)
    if constraints is not None and cfg.sampling and any(any(c) for c in constraints):
        raise UserError("lexical constraints need beam search: set decode.sampling=false")


def target_ids(tokenizer: Tokenizer, texts: Sequence[str], keep_start: bool) -> list[list[int]]:
    """Target ids of ``texts`` without BOS and EOS. The tokenizer's own start tokens (M2M100's
    target language) are kept only with ``keep_start``: a forced prefix begins with them, a
    constraint phrase does not."""
    start = 1 + (0 if keep_start else tokenizer.tgt_start)
    return [ids[start:-1] if text else [] for text, ids in zip(texts, tokenizer.encode_tgt(list(texts)))]


def prefix_ids(
    tokenizer: Tokenizer, cfg: DecodeConfig, prefix: str | Sequence[str] | None, n: int
) -> list[list[int]] | None:
    """Target ids (without BOS) of the forced prefixes of ``n`` sentences: ``prefix`` for
    all, one per sentence, or (None) decode.prefix; None without any."""
    prefix = cfg.prefix if prefix is None else prefix
    texts = [prefix] * n if isinstance(prefix, str) else prefix
    return None if texts is None else target_ids(tokenizer, texts, keep_start=True)


def line_guides(cfg: DecodeConfig) -> Iterator[tuple[str | None, list[str]]]:
    """Per input line: its forced prefix from decode.prefix_file (None without the file, ""
    for none) and its constraint phrases from decode.constraints_file (tab-separated)."""
    files = [(key, getattr(cfg, key)) for key in ("prefix_file", "constraints_file")]
    readers = [(line for _, line in open_text(path)) if path else itertools.repeat(None) for _, path in files]
    for number, (prefix, phrases) in enumerate(zip(*(itertools.chain(r, [False]) for r in readers)), start=1):
        for (key, path), value in zip(files, (prefix, phrases)):
            if value is False:
                raise UserError(f"decode.{key}={path} has {number - 1} lines, fewer than the input: give one per line")
        yield prefix, [p for p in (phrases or "").split("\t") if p.strip()]
