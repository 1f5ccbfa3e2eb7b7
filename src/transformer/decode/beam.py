"""Beam search: every step ranks each sentence's extensions (`ranking`), finishes the ones
ending in EOS (`finalize`), and carries the best k others forward as the next beams, one
`Rows.select` moving every per-row field (and the scorer's state) at once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from transformer.decode.finalize import Finished
from transformer.decode.ranking import Candidates, first_live, rank
from transformer.decode.rows import Rows
from transformer.decode.rules import NEG_INF, Columns, Hypothesis, apply_limits, force_prefix
from transformer.decode.scorer import Scorer, columns
from transformer.decode.spec import SearchSpec


def _widen(rows: Rows, log_probs: Tensor, k: int, running: int) -> tuple[Rows, Tensor]:
    """At the first step over a vocabulary under 2k: k copies of each row, all but one dead,
    so that ranking always finds k live candidates. Returns the copies and their log-probs."""
    if rows.tokens.size(0) // running >= k or log_probs.size(1) >= 2 * k:
        return rows, log_probs
    copies = torch.arange(rows.tokens.size(0), device=log_probs.device).repeat_interleave(k)
    rows = rows.select(copies)
    scores = torch.full((running, k), NEG_INF, device=log_probs.device)
    scores[:, 0] = 0.0
    rows.scores = scores.view(-1)
    return rows, log_probs[copies]


def _beam_rules(rows: Rows, log_probs: Tensor, t: int, spec: SearchSpec, cols: Columns) -> Tensor:
    """This step's log-probs (N, C) under the search's rules, in place: lengths (`apply_limits`),
    forced prefixes, and EOS held back from rows whose constraints are not all met until
    the length limit forces it."""
    log_probs = apply_limits(log_probs, t, spec.min_len, rows.max_len, cols)
    log_probs = force_prefix(log_probs, t, rows.prefix, rows.prefix_len, cols)
    if rows.constraints is not None:
        unmet = torch.tensor([not c.done for c in rows.constraints], device=log_probs.device)
        log_probs[unmet & (t + 1 < rows.max_len), cols.eos] = NEG_INF
    return log_probs


def _advance(rows: Rows, cands: Candidates, finished: Finished, length: int, spec: SearchSpec) -> Rows:
    """Expansion: each sentence's first k candidates not ending in EOS become its next beams,
    holding ``length`` tokens; sentences that may stop (`Finished.done`) leave the batch."""
    k, running = spec.beam_size, finished.running
    live = first_live(cands.token == spec.specials.eos, k)  # (B', k)
    source_row = cands.row.gather(1, live).view(-1)  # (N,) the row each new row extends
    token, token_lp = cands.token.gather(1, live).view(-1), cands.token_lp.gather(1, live).view(-1)
    scores = cands.score.gather(1, live)  # (B', k)
    done = finished.done(scores, rows.max_len.view(running, -1)[:, 0], length, spec)  # (B',)
    finished.keep(~done)
    keep = (~done).repeat_interleave(k)  # (N,)
    rows = rows.select(source_row[keep])
    rows.scores = scores.view(-1)[keep]
    rows.grow(token[keep], token_lp[keep])
    return rows


def beam_search_with(
    scorer: Scorer,
    src: Tensor,
    spec: SearchSpec,
    prefix: Sequence[Sequence[int]] | None = None,
    constraints: Sequence[Sequence[Sequence[int]]] | None = None,
) -> list[list[Hypothesis]]:
    """`beam_search` under ``spec``."""
    if not 1 <= spec.n_best <= spec.beam_size:
        raise ValueError(f"need 1 <= n_best ({spec.n_best}) <= beam_size ({spec.beam_size})")
    if spec.early_stop not in ("exact", "fairseq"):
        raise ValueError(f"unknown early_stop {spec.early_stop!r} (exact | fairseq)")
    rows = Rows.start(scorer, src, spec, prefix, constraints)
    finished = Finished.start(src.size(0), spec.n_best, src.device)
    cols = columns(scorer, spec.specials)
    t = 0
    while rows.origin.numel() > 0:
        log_probs, rows.state = scorer.step(rows.state, rows.tokens)
        rows.link()
        rows, log_probs = _widen(rows, log_probs, spec.beam_size, finished.running)
        log_probs = _beam_rules(rows, log_probs, t, spec, cols)  # (N, C)
        cands = rank(rows, log_probs, spec.beam_size, finished.running, cols)
        finished.add(rows, cands, t, spec)
        rows = _advance(rows, cands, finished, t + 1, spec)
        t += 1
    return finished.ranked(spec.n_best)


def beam_search(
    scorer: Scorer,
    src: Tensor,
    *,
    prefix: Sequence[Sequence[int]] | None = None,
    constraints: Sequence[Sequence[Sequence[int]]] | None = None,
    **settings: Any,
) -> list[list[Hypothesis]]:
    """Beam search over all sentences at once; `n_best` hypotheses each, best first. ``settings``:
    `SearchSpec` fields (beam_size, n_best, length_penalty, lp_style, early_stop, the lengths,
    specials, alignment).

    Each step every sentence ranks its beam * V extensions by running log-prob (by banks
    under constraints) and keeps the best 2 * beam (`ranking.rank`): among the first `beam` of
    them, those ending in EOS become finished hypotheses with score log_prob /
    length_penalty(len incl. EOS) (`Finished.add`, the rule fairseq uses); the first `beam`
    not ending in EOS are the next beams (`_advance`). Taking 2 * beam guarantees `beam` live
    candidates, as at most one EOS comes from each beam. The first step runs one row per
    sentence (all its beams would be the same BOS prefix) and then expands to `beam` rows; a
    vocabulary smaller than 2 * beam instead starts with `beam` copies of which all but one
    hold -inf (`_widen`). Sentences stop by the rule of `Finished.done` and leave the batch.

    With beam_size=1 and ``early_stop="fairseq"``, or with a non-growing penalty, this is
    greedy search. With a growing penalty the exact rule can keep a beam running after a
    finished hypothesis and so may find a better-scoring output than greedy.

    ``constraints`` and ``alignment``: see `rules`. A sentence returns fewer than `n_best`
    hypotheses only if fewer sequences have a nonzero probability under the rules.
    """
    return beam_search_with(scorer, src, SearchSpec(**settings), prefix, constraints)
