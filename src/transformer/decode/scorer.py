"""What search asks for next-token distributions: the ``Scorer`` protocol (start / select /
step), an ``Ensemble`` of scorers, and ``ModelScorer``, one ``Transformer`` as a scorer.

Search is written against the protocol rather than the model, so that one code path serves a
cached model, an uncached model (``cached=False`` reruns the full prefix: the reference in
tests) and an ensemble, and so that tests can drive it with scripted distributions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer.decode.fast import output_rows
from transformer.decode.rules import Columns
from transformer.model import Transformer
from transformer.model.cache import DecoderCache
from transformer.vocab import Specials


class Scorer(Protocol):
    """Anything that scores next tokens: one model (cached or uncached) or an ensemble.

    A scorer may have ``vocab``, sorted target ids (K,) (a shortlist's candidates): its steps
    then score those ids only, one column each (``columns``); without it, every id."""

    def start(self, src: Tensor) -> Any:
        """Encode src (B, S) LongTensor padded with PAD; return an opaque decoder state with B rows."""

    def select(self, state: Any, index: Tensor) -> Any:
        """State whose rows are state's rows at `index` (LongTensor (N,)): used to expand each
        sentence to `beam` rows, to reorder beams, and to drop finished sentences."""

    def step(self, state: Any, prefix: Tensor) -> tuple[Tensor, Any]:
        """prefix (N, t) LongTensor: every row starts with BOS and holds the t tokens so far.
        Returns (log_probs (N, C) float32, normalised log-softmax over the target vocabulary,
        one column per id, or per id of ``vocab``; new state); search owns the returned
        tensor and may modify it in place. A cached implementation uses only prefix[:, -1]
        and appends to its key/value cache; an uncached one reruns the whole prefix. After `select`, the state corresponds to the
        selected rows' prefixes."""

    def attention(self, state: Any) -> Tensor:
        """Cross-attention (N, S) of the newest step, rows summing to one: asked for only when
        a search wants alignments (scorers that cannot tell may leave it out)."""


class Ensemble:
    """Several scorers over one vocabulary acting as one: the mean of their probabilities.

    Averaging probabilities (not log-probs) is what fairseq does; it keeps the result a
    normalised distribution, so search and scores need no special case for ensembles.
    """

    def __init__(self, scorers: Sequence[Scorer]) -> None:
        if not scorers:
            raise ValueError("an ensemble needs at least one scorer")
        self.scorers = list(scorers)
        self.vocab = getattr(self.scorers[0], "vocab", None)  # make_scorer gives them all the same

    def start(self, src: Tensor) -> list[Any]:
        return [s.start(src) for s in self.scorers]

    def select(self, state: list[Any], index: Tensor) -> list[Any]:
        return [s.select(st, index) for s, st in zip(self.scorers, state)]

    def step(self, state: list[Any], prefix: Tensor) -> tuple[Tensor, list[Any]]:
        outputs = [s.step(st, prefix) for s, st in zip(self.scorers, state)]
        stacked = torch.stack([lp for lp, _ in outputs])  # (M, N, V)
        log_probs = torch.logsumexp(stacked, dim=0) - math.log(len(self.scorers))  # (N, V)
        return log_probs, [st for _, st in outputs]

    def attention(self, state: list[Any]) -> Tensor:
        return torch.stack([s.attention(st) for s, st in zip(self.scorers, state)]).mean(dim=0)


def columns(scorer: Scorer, specials: Specials) -> Columns:
    """What the columns of ``scorer``'s log-probs stand for (a scorer without ``vocab``: every id)."""
    return Columns.of(specials, getattr(scorer, "vocab", None))


def attended(scorer: Scorer, state: Any, src_real: Tensor) -> Tensor:
    """Per row (N,), the source position of the newest step's largest cross-attention among
    the real source tokens `src_real` (N, S) (not PAD or EOS, as fairseq's hard alignments)."""
    return scorer.attention(state).float().masked_fill(~src_real, -1.0).argmax(dim=1)


class ModelScorer:
    """One model as a search scorer; with ``align_layer``, cached steps also keep that decoder
    layer's cross-attention for alignments (negative counts from the end, clamped to the first).
    With ``vocab`` (K,) sorted target ids (a shortlist's candidates), the output projection and
    the softmax run over those rows only, and a step's log-probs have one column per candidate."""

    def __init__(
        self, model: Transformer, cached: bool = True, align_layer: int | None = None, vocab: Tensor | None = None
    ):
        self.model, self.cached, self.vocab = model, cached, vocab
        self.align_layer = align_layer if align_layer is None else max(align_layer, -model.cfg.n_decoder_layers)
        self.project = model.output if vocab is None else output_rows(model.output, vocab)

    def start(self, src: Tensor) -> DecoderCache | dict:
        memory, mask = self.model.encode(src)
        if self.cached:
            return self.model.start_cache(memory, mask, self.align_layer)
        return {"memory": memory, "mask": mask}

    def select(self, state: DecoderCache | dict, index: Tensor) -> DecoderCache | dict:
        if self.cached:
            return self.model.select_cache(state, index)
        return {"memory": state["memory"].index_select(0, index), "mask": state["mask"].index_select(0, index)}

    def step(self, state: DecoderCache | dict, prefix: Tensor) -> tuple[Tensor, DecoderCache | dict]:
        if self.cached:
            hidden = self.model.decode_step(prefix[:, -1:], state)  # (N, D)
        else:
            hidden = self.model.decode(prefix, state["memory"], state["mask"])[:, -1]
        return F.log_softmax(self.project(hidden).float(), dim=-1), state

    def attention(self, state: DecoderCache | dict) -> Tensor:
        if not isinstance(state, DecoderCache) or state.alignment is None:
            raise ValueError("alignments need a cached ModelScorer made with align_layer")
        return state.alignment


def make_scorer(
    models: Sequence[Transformer], cached: bool = True, align_layer: int | None = None, vocab: Tensor | None = None
) -> Scorer:
    scorers = [ModelScorer(m, cached, align_layer, vocab) for m in models]
    return scorers[0] if len(scorers) == 1 else Ensemble(scorers)
