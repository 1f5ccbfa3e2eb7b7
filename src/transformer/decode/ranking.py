"""Ranking a beam search step's extensions: each running sentence's best 2k candidates by
running log-prob, re-ranked under lexical constraints by dynamic beam allocation (as
fairseq's constrained search), and the first k that do not end in EOS."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from transformer.decode.constraints import ConstraintState, allocate
from transformer.decode.rows import Rows
from transformer.decode.rules import NEG_INF, Columns


@dataclass
class Candidates:
    """A step's best extensions of every running sentence, best first: (B', C) each."""

    score: Tensor  # running log-prob after the token
    row: Tensor  # the extended row (in N)
    token: Tensor
    token_lp: Tensor  # log-prob of the token alone


def rank(rows: Rows, log_probs: Tensor, k: int, running: int, cols: Columns) -> Candidates:
    """Each of the ``running`` sentences' best 2k extensions by running log-prob, without a
    pass over all width * V of them: a sentence's best 2k are among the best 2k tokens of each
    of its rows. Under constraints they are ranked again by `_allocate`. ``log_probs`` (N, C)
    has the columns ``cols``; the candidates hold target ids."""
    width = rows.tokens.size(0) // running
    row_top, row_column = log_probs.topk(min(2 * k, log_probs.size(1)), dim=1)  # (N, c)
    row_token = cols.token(row_column)
    token_lp = row_top.view(running, -1)  # (B', width * c)
    per_row = row_top.size(1)
    candidates = rows.scores.view(running, width).repeat_interleave(per_row, dim=1) + token_lp
    top, flat = candidates.topk(min(2 * k, candidates.size(1)), dim=1)  # (B', 2k)
    row = flat // per_row + torch.arange(running, device=top.device)[:, None] * width
    cands = Candidates(top, row, row_token.view(running, -1).gather(1, flat), token_lp.gather(1, flat))
    return cands if rows.constraints is None else _allocate(rows, rows.constraints, cands, log_probs, k, cols)


def first_live(is_eos: Tensor, beam: int) -> Tensor:
    """Column indices of the first `beam` non-EOS candidates of each row, in rank order.

    is_eos (B, C) with candidates sorted best first; returns (B, beam).
    """
    columns = is_eos.size(1)
    key = is_eos.long() * columns + torch.arange(columns, device=is_eos.device)  # (B, C) EOS sorts last
    return key.argsort(dim=1)[:, :beam]


def _options(
    rows: Rows,
    states: list[ConstraintState],
    cands: Candidates,
    log_probs: Tensor,
    i: int,
    best_token: list[int],
    cols: Columns,
) -> list[tuple[float, int, int, float]]:
    """Running sentence i's extensions to rank under constraints, each (row, token) once, as
    (running log-prob, row, token, token log-prob): its plain candidates, and for each live
    row the tokens that advance its constraints, its best token and EOS (possible only once
    its constraints are met, see `beam._beam_rules`)."""
    found = {}
    columns = (cands.score[i], cands.row[i], cands.token[i], cands.token_lp[i])
    for score, row, token, lp in zip(*(c.tolist() for c in columns)):
        if score > NEG_INF:
            found[(row, token)] = (score, lp)
    width = rows.tokens.size(0) // cands.score.size(0)
    for row in range(i * width, (i + 1) * width):
        wanted = sorted(states[row].next_tokens() | {best_token[row], cols.specials.eos})
        lps = log_probs[row, cols.column(torch.tensor(wanted, device=log_probs.device))]
        for token, score, lp in zip(wanted, (rows.scores[row] + lps).tolist(), lps.tolist()):
            if score > NEG_INF:
                found.setdefault((row, token), (score, lp))
    return [(score, row, token, lp) for (row, token), (score, lp) in found.items()]


def _allocate(
    rows: Rows, states: list[ConstraintState], cands: Candidates, log_probs: Tensor, k: int, cols: Columns
) -> Candidates:
    """Ranking under constraints (B', C): every sentence with constraints ranks its `_options`
    by dynamic beam allocation (`constraints.allocate`), banked by the constraint tokens
    each would have met, so that finishing (EOS among the first k) and `first_live` read
    the new order as they read plain ranks (as fairseq's constrained search). Sentences
    without constraints keep their plain ranks. Rows end with k dead (-inf) candidates, so
    that k live ones always exist."""
    running = cands.score.size(0)
    width = rows.tokens.size(0) // running
    plain = [c.tolist() for c in (cands.score, cands.row, cands.token, cands.token_lp)]
    best_token = cols.token(log_probs.argmax(dim=1)).tolist()
    ranked = []
    for i in range(running):
        if states[i * width].total == 0:
            ranked.append(list(zip(*(c[i] for c in plain))))
            continue
        options = _options(rows, states, cands, log_probs, i, best_token, cols)
        banks = [states[row].advance(token).count for _, row, token, _ in options]
        ranked.append([options[j] for j in allocate([o[0] for o in options], banks, len(options))])
    columns = max(len(r) for r in ranked) + k
    padded = [r + [(NEG_INF, i * width, cols.specials.pad, NEG_INF)] * (columns - len(r)) for i, r in enumerate(ranked)]
    fields = [[[option[f] for option in r] for r in padded] for f in range(4)]  # per field: (B', C)
    dtypes = (cands.score.dtype, torch.long, torch.long, cands.token_lp.dtype)
    return Candidates(*(torch.tensor(f, dtype=d, device=cands.score.device) for f, d in zip(fields, dtypes)))
