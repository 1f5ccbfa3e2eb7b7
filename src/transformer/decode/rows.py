"""The per-row state of a search as one record: row r of every field belongs to one
hypothesis in the making, so a single ``select`` widens, reorders or drops them all alike (the
scorer's decoder state too). A new per-row feature (a guide, a per-token record) is one field
here; no step function reorders anything by hand."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from transformer.decode.constraints import ConstraintState
from transformer.decode.rules import max_lengths, prefix_tensor, real_tokens, src_lengths
from transformer.decode.scorer import Scorer, attended
from transformer.decode.spec import SearchSpec

NOT_PER_ROW = ("scorer", "state")  # the scorer reorders its own state


@dataclass
class Rows:
    """What a search carries between steps, one entry per row (N rows)."""

    scorer: Scorer
    state: Any  # the scorer's decoder state, N rows
    origin: Tensor  # (N,) the output a row is for: beam search's input sentence, greedy's output slot
    tokens: Tensor  # (N, t+1) BOS and the tokens so far
    token_lps: Tensor  # (N, t) their log-probs
    scores: Tensor  # (N,) running log-prob (beam search's)
    max_len: Tensor  # (N,) tokens a row may generate, EOS included
    prefix: Tensor  # (N, P) forced prefix, PAD after its end
    prefix_len: Tensor  # (N,)
    constraints: list[ConstraintState] | None = None  # each row's lexical constraints; None: no sentence has any
    src_real: Tensor | None = None  # (N, S) source positions alignments may point to; None: no alignments
    links: Tensor | None = (
        None  # (N, t') per step so far (t' = t, or t + 1 once `link` ran), the source position attended most
    )

    @classmethod
    def start(
        cls,
        scorer: Scorer,
        src: Tensor,
        spec: SearchSpec,
        prefix: Sequence[Sequence[int]] | None = None,
        constraints: Sequence[Sequence[Sequence[int]]] | None = None,
    ) -> Rows:
        """One row per sentence of ``src`` (B, S) holding BOS."""
        batch, device, specials = src.size(0), src.device, spec.specials
        max_len = max_lengths(src_lengths(src, specials), spec.max_len_a, spec.max_len_b, spec.max_len_limit)
        forced, forced_len = prefix_tensor(prefix, max_len)
        states = [ConstraintState.start(c) for c in constraints] if constraints is not None else []
        if constraints is not None and len(states) != batch:
            raise ValueError(f"{len(states)} constraint lists for {batch} sentences")
        return cls(
            scorer=scorer,
            state=scorer.start(src),
            origin=torch.arange(batch, device=device),
            tokens=torch.full((batch, 1), specials.bos, dtype=torch.long, device=device),
            token_lps=torch.zeros(batch, 0, device=device),
            scores=torch.zeros(batch, device=device),
            max_len=max_len,
            prefix=forced,
            prefix_len=forced_len,
            constraints=states if any(s.phrases for s in states) else None,
            src_real=real_tokens(src, specials) if spec.alignment else None,
            links=torch.zeros(batch, 0, dtype=torch.long, device=device) if spec.alignment else None,
        )

    def select(self, rows: Tensor) -> Rows:
        """The record of rows ``rows`` (N',) of this one: every field reordered alike. An empty
        selection ends the search: the scorer is not asked for a state without rows."""
        taken = {f.name: _take(getattr(self, f.name), rows) for f in fields(self) if f.name not in NOT_PER_ROW}
        state = self.scorer.select(self.state, rows) if rows.numel() > 0 else None
        return Rows(scorer=self.scorer, state=state, **taken)

    def link(self) -> None:
        """With alignments, record the source position this step (the newest ``scorer.step``) attended most."""
        if self.links is not None and self.src_real is not None:
            self.links = torch.cat([self.links, attended(self.scorer, self.state, self.src_real)[:, None]], dim=1)

    def grow(self, token: Tensor, token_lp: Tensor) -> None:
        """Append each row's next token (N,) and its log-prob (N,); constraints advance with it."""
        self.tokens = torch.cat([self.tokens, token[:, None]], dim=1)
        self.token_lps = torch.cat([self.token_lps, token_lp.view(-1, 1)], dim=1)
        if self.constraints is not None:
            self.constraints = [c.advance(x) for c, x in zip(self.constraints, token.tolist())]


def _take(value: Tensor | list | None, rows: Tensor) -> Any:
    """``value``'s entries at ``rows``: a tensor's first dimension, a list's items."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value[rows]
    return [value[i] for i in rows.tolist()]
