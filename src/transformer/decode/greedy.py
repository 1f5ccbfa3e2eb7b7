"""Left-to-right decoding with one row per output: greedy search (the best token at every
step) and sampling (``n`` independent draws per sentence, e.g. for back-translation)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from transformer.decode.rows import Rows
from transformer.decode.rules import Hypothesis, apply_limits, force_prefix
from transformer.decode.scorer import Scorer, columns
from transformer.decode.spec import SearchSpec


def decode_rows(
    scorer: Scorer,
    src: Tensor,
    spec: SearchSpec,
    copies: int,
    choose: Callable[[Tensor], Tensor] | None,
    prefix: Sequence[Sequence[int]] | None = None,
) -> list[list[Hypothesis]]:
    """Each sentence gets `copies` independent rows; `choose` picks each row's next token's
    column (None: the most probable, read from the same pass over the log-probs that finds
    dead rows).

    A row stops when it emits EOS and is dropped from the batch; its score is its log-prob
    (no length penalty). A row left with no possible token (the scorer gave them all
    probability 0) ends with EOS at log-prob -inf.
    """
    batch, eos = src.size(0), spec.specials.eos
    cols = columns(scorer, spec.specials)
    rows = Rows.start(scorer, src, spec, prefix)
    if copies > 1:
        rows = rows.select(torch.arange(batch, device=src.device).repeat_interleave(copies))
    rows.origin = torch.arange(batch * copies, device=src.device)  # output slot: sentence * copies + k
    results: list[Hypothesis | None] = [None] * (batch * copies)
    t = 0
    while rows.origin.numel() > 0:
        log_probs, rows.state = scorer.step(rows.state, rows.tokens)
        rows.link()
        log_probs = apply_limits(log_probs, t, spec.min_len, rows.max_len, cols)  # (N, C)
        log_probs = force_prefix(log_probs, t, rows.prefix, rows.prefix_len, cols)
        best, choice = log_probs.max(dim=1)
        dead = ~torch.isfinite(best)  # (N,) nothing possible: finish now
        if choose is not None:
            choice = choose(log_probs.masked_fill(dead[:, None], 0.0) if bool(dead.any()) else log_probs)
        choice = torch.where(dead, cols.eos, choice)  # (N,) columns
        token = cols.token(choice)
        rows.grow(token, log_probs.gather(1, choice[:, None]))
        done = token == eos  # (N,)
        if bool(done.any()):
            _finish_rows(rows, done, results)
            rows = rows.select((~done).nonzero().flatten())
        t += 1
    return [[h for h in results[s * copies : (s + 1) * copies] if h is not None] for s in range(batch)]


def _finish_rows(rows: Rows, done: Tensor, results: list[Hypothesis | None]) -> None:
    """The rows that just emitted EOS (`done` (N,)) become hypotheses in their output slots."""
    ended = done.nonzero().flatten()
    ended_tokens, ended_lps = rows.tokens[ended, 1:].tolist(), rows.token_lps[ended].tolist()
    totals = rows.token_lps[ended].double().sum(dim=1).tolist()
    links = rows.links[ended].tolist() if rows.links is not None else [None] * len(totals)
    for slot, toks, lps, total, link in zip(rows.origin[ended].tolist(), ended_tokens, ended_lps, totals, links):
        results[slot] = Hypothesis(toks, score=total, log_prob=total, token_log_probs=lps, alignment=link)


def greedy_search(
    scorer: Scorer, src: Tensor, *, prefix: Sequence[Sequence[int]] | None = None, **settings: Any
) -> list[list[Hypothesis]]:
    """The most probable next token at every step; one hypothesis per sentence. ``settings``:
    `SearchSpec` fields (max_len_a, max_len_b, max_len_limit, min_len, specials, alignment).

    Scores are plain log-probs. Equals `beam_search(beam_size=1)` token for token whenever
    that beam search stops at its first finished hypothesis (see `beam_search`).
    """
    return greedy_with(scorer, src, SearchSpec(**settings), prefix)


def greedy_with(
    scorer: Scorer, src: Tensor, spec: SearchSpec, prefix: Sequence[Sequence[int]] | None = None
) -> list[list[Hypothesis]]:
    """`greedy_search` under ``spec``."""
    return decode_rows(scorer, src, spec, 1, None, prefix)
