"""The rules every search applies to a step's log-probs, and what a search returns.

Conventions shared by all searches (`greedy`, `sampling`, `beam`):

* ``max_len`` counts generated tokens including EOS (BOS is not generated); at the
  last allowed position only EOS may be chosen, so every hypothesis finishes.
* ``min_len`` counts tokens before EOS: EOS gets log-prob ``-inf`` while fewer than
  ``min_len`` tokens have been generated.
* PAD and BOS are never generated (BOS is the decoder's start token; when that is EOS, as
  in M2M100, only PAD). The ids come from ``specials`` (``transformer.vocab.Specials``);
  ``specials.forced_bos`` >= 0 is the only possible first token, at log-prob 0 (HF's
  ``forced_bos_token_id``: M2M100's target language).
* ``prefix`` (per sentence a list of target ids, possibly empty) forces the first tokens
  of every output of that sentence; each forced token keeps the model's log-prob, so it
  counts in the score, and search continues after it. A prefix must leave room for EOS
  within the maximum length (ValueError otherwise). A prefix counts towards ``min_len``.
* ``constraints`` (beam search only) gives each sentence phrases (target id lists) its
  outputs must contain, in any order (`transformer.decode.constraints`): a row may emit EOS
  only once it has met them all, and candidates are ranked by dynamic beam allocation
  (`allocation.rank_constrained`). At the length limit EOS is forced regardless; such hypotheses carry
  ``constraints_met=False`` and rank after every hypothesis that met its constraints, so
  the best unmet one is returned only when none met them. No constraints (None, or only
  empty lists) is plain beam search exactly.
* ``alignment=True`` asks the scorer for each step's cross-attention (``scorer.Scorer.attention``)
  and gives every hypothesis, per token, the source position attended most (PAD and EOS
  excluded); the positions travel with their hypothesis through beam reordering.
* Impossible choices carry ``float('-inf')``, never a large negative constant, so a
  hypothesis that would need one is recognised as dead rather than merely unlikely.
* A step's log-probs have one column per target id, or, under a vocabulary shortlist, one
  per candidate (``Columns``): searches rank columns, rows keep ids, and these rules find
  the columns of the ids they touch there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from transformer.vocab import PAD, Specials

NEG_INF = float("-inf")


@dataclass
class Hypothesis:
    tokens: list[int]  # target ids WITHOUT BOS, ending with EOS if it finished, no PAD
    score: float  # the ranking score (log-prob after length penalty)
    log_prob: float  # sum of token log-probs (including EOS)
    token_log_probs: list[float]
    constraints_met: bool = True  # False: the length limit ended it before all its constraints appeared
    alignment: list[int] | None = None  # per token (EOS too): the source position its step attended most


@dataclass(frozen=True)
class Columns:
    """What the columns of a step's log-probs stand for: every target id in order (``ids``
    None), or a shortlist's candidates, sorted ids (K,) that hold EOS and every forced or
    constrained token (``fast.required_tokens``); with the special ids' columns, found once."""

    specials: Specials
    ids: Tensor | None
    eos: int
    forced_bos: int  # -1: none
    never_generated: tuple[int, ...]  # the columns of those of ``specials.never_generated`` present

    @classmethod
    def of(cls, specials: Specials, ids: Tensor | None = None) -> Columns:
        """The columns of the candidates ``ids`` (None: of the whole vocabulary)."""

        def column_of(token: int) -> int:  # -1: not among the candidates (or no token)
            if ids is None or token < 0:
                return token
            hit = (ids == token).nonzero().flatten()
            return int(hit[0]) if hit.numel() else -1

        eos, forced_bos = column_of(specials.eos), column_of(specials.forced_bos)
        if eos < 0 or forced_bos < 0 <= specials.forced_bos:
            raise ValueError("the candidate ids must hold EOS and the forced first token")
        never = tuple(c for c in map(column_of, specials.never_generated) if c >= 0)
        return cls(specials, ids, eos, forced_bos, never)

    def token(self, column: Tensor) -> Tensor:
        """The target ids of ``column`` (any shape)."""
        return column if self.ids is None else self.ids[column]

    def column(self, token: Tensor) -> Tensor:
        """The columns of target ids ``token`` (any shape), all among the candidates."""
        return token if self.ids is None else torch.searchsorted(self.ids, token)


def max_lengths(src_lengths: Tensor, a: float, b: int, limit: int) -> Tensor:
    """Per sentence: floor(a * len + b) generated tokens including EOS, capped at `limit`.

    At least 1, so that even an empty source can emit EOS.
    """
    lengths = torch.floor(a * src_lengths.double() + b).long()  # (B,)
    return lengths.clamp(min=1, max=max(limit, 1))


def length_penalty(length: float | Tensor, alpha: float, style: str = "gnmt") -> float | Tensor:
    """Divisor of a hypothesis's log-prob, so that longer outputs are not unfairly punished.

    style "gnmt" (Wu et al. 2016): ((5 + len) / 6) ** alpha; "average": len ** alpha;
    "none": 1. Works on ints, floats and tensors alike.
    """
    if isinstance(length, Tensor):
        length = length.double()
    if style == "gnmt":
        return ((5 + length) / 6) ** alpha
    if style == "average":
        return length**alpha
    if style == "none":
        return length * 0 + 1.0
    raise ValueError(f"unknown length penalty style {style!r} (gnmt | average | none)")


def src_lengths(src: Tensor, specials: Specials) -> Tensor:
    return (src != specials.pad).sum(dim=1)  # (B,)


def apply_limits(log_probs: Tensor, t: int, min_len: int, max_len: Tensor, columns: Columns) -> Tensor:
    """Apply the rules of the search, in place, to the log-probs for the (t+1)-th token.

    max_len (N,) per row. Only whole columns and forced rows are touched (no pass over
    all N x V values), except for a forced first token; nothing is renormalised.
    """
    eos_id = columns.eos
    for column in columns.never_generated:
        log_probs[:, column] = NEG_INF
    if t == 0 and columns.forced_bos >= 0:
        log_probs.fill_(NEG_INF)
        log_probs[:, columns.forced_bos] = 0.0
    if t < min_len:
        log_probs[:, eos_id] = NEG_INF
    force = t + 1 >= max_len  # (N,) last allowed position: EOS only
    if bool(force.any()):
        eos = log_probs[force, eos_id]
        log_probs[force] = NEG_INF
        log_probs[force, eos_id] = eos
    return log_probs


def real_tokens(src: Tensor, specials: Specials) -> Tensor:
    """(B, S): source positions an alignment may point to; all of them for a source with none."""
    real = (src != specials.pad) & (src != specials.eos)
    return real | ~real.any(dim=1, keepdim=True)


def prefix_tensor(prefix: Sequence[Sequence[int]] | None, max_len: Tensor) -> tuple[Tensor, Tensor]:
    """Forced prefixes as ids (B, P), PAD after each one's end, and lengths (B,).

    Every prefix must leave room for EOS within its sentence's maximum length."""
    batch, device = max_len.numel(), max_len.device
    rows = [list(r) for r in prefix] if prefix is not None else [[] for _ in range(batch)]
    if len(rows) != batch:
        raise ValueError(f"{len(rows)} prefixes for {batch} sentences")
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)
    for i in (lengths >= max_len).nonzero().flatten().tolist():
        raise ValueError(
            f"sentence {i}: its prefix of {len(rows[i])} tokens leaves no room for EOS in {int(max_len[i])}"
        )
    width = int(lengths.max()) if batch else 0
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    return ids.view(batch, width), lengths


def force_prefix(log_probs: Tensor, t: int, prefix: Tensor, lengths: Tensor, columns: Columns) -> Tensor:
    """Rows still inside their prefix (N, P) may only take its next token, at that token's own
    log-prob (so forced tokens count in the score, as CTranslate2's target_prefix does)."""
    if t >= prefix.size(1):
        return log_probs
    forced = (t < lengths).nonzero().flatten()
    if forced.numel() > 0:
        token = columns.column(prefix[forced, t])
        kept = log_probs[forced, token]
        log_probs[forced] = NEG_INF
        log_probs[forced, token] = kept
    return log_probs
