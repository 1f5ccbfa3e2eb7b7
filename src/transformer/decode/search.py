"""Turning next-token distributions into translations: greedy, beam search and sampling.

Search is written against a tiny `Scorer` protocol (`scorer`) rather than against the model,
so one code path serves a cached model, an uncached model and an ensemble, and tests drive
it with scripted distributions whose best sequences are known exactly. Everything is batched
over sentences: sentences that finish leave the batch, so later steps only pay for the ones
still running, and results come back in input order. The conventions every search follows
are in `rules`; the per-row state is one record (`rows.Rows`).

| module | job |
|---|---|
| `spec` | `SearchSpec`, the settings of a search, built once from `DecodeConfig` |
| `rules` | the rules of a step (lengths, specials, prefixes) and `Hypothesis` |
| `rows` | the per-row state with its one `select` |
| `greedy`, `sampling` | one row per output |
| `beam`, `ranking`, `finalize` | the beam loop, ranking candidates, finishing hypotheses |

This module chooses among them (`search`) and is where callers import them from.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from transformer.decode.beam import beam_search, beam_search_with
from transformer.decode.greedy import greedy_search, greedy_with
from transformer.decode.rules import NEG_INF, Hypothesis, length_penalty, max_lengths
from transformer.decode.sampling import draw, filter_logits, sample, sample_with
from transformer.decode.scorer import Ensemble, Scorer
from transformer.decode.spec import SearchSpec
from transformer.vocab import BOS, EOS, PAD  # the defaults, imported from here by callers

__all__ = [
    "BOS",
    "EOS",
    "NEG_INF",
    "PAD",
    "Ensemble",
    "Hypothesis",
    "Scorer",
    "beam_search",
    "draw",
    "filter_logits",
    "greedy_search",
    "length_penalty",
    "max_lengths",
    "sample",
    "search",
]


def search(
    scorer: Scorer,
    src: Tensor,
    spec: SearchSpec,
    prefix: Sequence[list[int]] | None = None,
    constraints: Sequence[list[list[int]]] | None = None,
) -> list[list[Hypothesis]]:
    """Run the search ``spec`` asks for on one padded batch; constraints need beam search (a
    beam of 1 with constraints is a beam search, not greedy)."""
    if spec.sampling:
        return sample_with(scorer, src, spec, prefix)
    if spec.beam_size <= 1 and not any(constraints or []):
        return greedy_with(scorer, src, spec, prefix)
    return beam_search_with(scorer, src, spec, prefix, constraints)
