"""Turning next-token distributions into translations: greedy, beam search and sampling.

Search is written against a tiny `Scorer` protocol (start / select / step) rather than
against the model, so that one code path serves a cached model, an uncached model and
an ensemble, and so that it can be tested with scripted distributions whose best
sequences are known exactly. Everything is batched over sentences: sentences that
finish are dropped from the batch so later steps only pay for the ones still running,
and results are handed back in input order.

Conventions shared by all searches:

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
  (`_allocate`). At the length limit EOS is forced regardless; such hypotheses carry
  ``constraints_met=False`` and rank after every hypothesis that met its constraints, so
  the best unmet one is returned only when none met them. No constraints (None, or only
  empty lists) is plain beam search exactly.
* ``alignment=True`` asks the scorer for each step's cross-attention (``Scorer.attention``)
  and gives every hypothesis, per token, the source position attended most (PAD and EOS
  excluded); the positions travel with their hypothesis through beam reordering.
* Impossible choices carry ``float('-inf')``, never a large negative constant, so a
  hypothesis that would need one is recognised as dead rather than merely unlikely.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from transformer.decode.constraints import Progress, allocate
from transformer.vocab import BOS, EOS, PAD, Specials  # noqa: F401 (BOS, EOS, PAD: the defaults, imported from here by callers)

NEG_INF = float("-inf")


class Scorer(Protocol):
    """Anything that scores next tokens: one model (cached or uncached) or an ensemble."""

    def start(self, src: Tensor) -> Any:
        """Encode src (B, S) LongTensor padded with PAD; return an opaque decoder state with B rows."""

    def select(self, state: Any, index: Tensor) -> Any:
        """State whose rows are state's rows at `index` (LongTensor (N,)): used to expand each
        sentence to `beam` rows, to reorder beams, and to drop finished sentences."""

    def step(self, state: Any, prefix: Tensor) -> tuple[Tensor, Any]:
        """prefix (N, t) LongTensor: every row starts with BOS and holds the t tokens so far.
        Returns (log_probs (N, V) float32, normalised log-softmax over the target vocabulary,
        new state); search owns the returned tensor and may modify it in place. A cached
        implementation uses only prefix[:, -1] and appends to its key/value cache; an
        uncached one reruns the whole prefix. After `select`, the state corresponds to the
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


@dataclass
class Hypothesis:
    tokens: list[int]  # target ids WITHOUT BOS, ending with EOS if it finished, no PAD
    score: float  # the ranking score (log-prob after length penalty)
    log_prob: float  # sum of token log-probs (including EOS)
    token_log_probs: list[float]
    constraints_met: bool = True  # False: the length limit ended it before all its constraints appeared
    alignment: list[int] | None = None  # per token (EOS too): the source position its step attended most


# ----------------------------------------------------------------------------- helpers


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


_penalty = length_penalty  # beam_search's `length_penalty` argument shadows the function


def _src_lengths(src: Tensor, specials: Specials) -> Tensor:
    return (src != specials.pad).sum(dim=1)  # (B,)


def _constrain(log_probs: Tensor, t: int, min_len: int, max_len: Tensor, specials: Specials = Specials()) -> Tensor:
    """Apply the rules of the search, in place, to the log-probs for the (t+1)-th token.

    max_len (N,) per row. Only whole columns and forced rows are touched (no pass over
    all N x V values), except for a forced first token; nothing is renormalised.
    """
    eos_id = specials.eos
    for token in specials.never_generated:
        log_probs[:, token] = NEG_INF
    if t == 0 and specials.forced_bos >= 0:
        log_probs.fill_(NEG_INF)
        log_probs[:, specials.forced_bos] = 0.0
    if t < min_len:
        log_probs[:, eos_id] = NEG_INF
    force = t + 1 >= max_len  # (N,) last allowed position: EOS only
    if bool(force.any()):
        eos = log_probs[force, eos_id]
        log_probs[force] = NEG_INF
        log_probs[force, eos_id] = eos
    return log_probs


def _attended(scorer: Scorer, state: Any, src_real: Tensor) -> Tensor:
    """Per row (N,), the source position of the newest step's largest cross-attention among
    the real source tokens `src_real` (N, S) (not PAD or EOS, as fairseq's hard alignments)."""
    return scorer.attention(state).float().masked_fill(~src_real, -1.0).argmax(dim=1)


def _real_tokens(src: Tensor, specials: Specials) -> Tensor:
    """(B, S): source positions an alignment may point to; all of them for a source with none."""
    real = (src != specials.pad) & (src != specials.eos)
    return real | ~real.any(dim=1, keepdim=True)


def _prefixes(prefix: Sequence[Sequence[int]] | None, max_len: Tensor) -> tuple[Tensor, Tensor]:
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


def _force_prefix(log_probs: Tensor, t: int, prefix: Tensor, lengths: Tensor) -> Tensor:
    """Rows still inside their prefix (N, P) may only take its next token, at that token's own
    log-prob (so forced tokens count in the score, as CTranslate2's target_prefix does)."""
    if t >= prefix.size(1):
        return log_probs
    forced = (t < lengths).nonzero().flatten()
    if forced.numel() > 0:
        token = prefix[forced, t]
        kept = log_probs[forced, token]
        log_probs[forced] = NEG_INF
        log_probs[forced, token] = kept
    return log_probs


# ------------------------------------------------------------------ greedy and sampling


def _decode_rows(
    scorer: Scorer,
    src: Tensor,
    copies: int,
    choose: Callable[[Tensor], Tensor],
    max_len_a: float,
    max_len_b: int,
    max_len_limit: int,
    min_len: int,
    specials: Specials,
    prefix: Sequence[Sequence[int]] | None = None,
    alignment: bool = False,
) -> list[list[Hypothesis]]:
    """Left-to-right decoding with one row per output; `choose` picks each row's next token.

    Each sentence gets `copies` independent rows. A row stops when it emits EOS and
    is dropped from the batch; its score is its log-prob (no length penalty). A row
    left with no possible token (the scorer gave them all probability 0) ends with EOS
    at log-prob -inf.
    """
    batch, device = src.size(0), src.device
    max_len = max_lengths(_src_lengths(src, specials), max_len_a, max_len_b, max_len_limit)
    forced, forced_len = _prefixes(prefix, max_len)
    run = {  # per row: output slot sentence * copies + k, its limits, and what it has generated
        "slot": torch.arange(batch * copies, device=device),
        "max_len": max_len.repeat_interleave(copies),
        "prefix": forced.repeat_interleave(copies, dim=0),
        "prefix_len": forced_len.repeat_interleave(copies),
        "tokens": torch.full((batch * copies, 1), specials.bos, dtype=torch.long, device=device),  # (N, t+1)
        "token_lps": torch.zeros(batch * copies, 0, device=device),  # (N, t)
    }
    if alignment:
        run["src_real"] = _real_tokens(src, specials).repeat_interleave(copies, dim=0)  # (N, S)
        run["links"] = torch.zeros(batch * copies, 0, dtype=torch.long, device=device)  # (N, t)
    state = scorer.start(src)
    if copies > 1:
        state = scorer.select(state, torch.arange(batch, device=device).repeat_interleave(copies))
    results: list[Hypothesis | None] = [None] * (batch * copies)
    t = 0
    while run["slot"].numel() > 0:
        log_probs, state = scorer.step(state, run["tokens"])
        if alignment:
            run["links"] = torch.cat([run["links"], _attended(scorer, state, run["src_real"])[:, None]], dim=1)
        log_probs = _constrain(log_probs, t, min_len, run["max_len"], specials)  # (N, V)
        log_probs = _force_prefix(log_probs, t, run["prefix"], run["prefix_len"])
        dead = ~torch.isfinite(log_probs).any(dim=1)  # (N,) nothing possible: finish now
        choice = torch.where(dead, specials.eos, choose(log_probs.masked_fill(dead[:, None], 0.0)))  # (N,)
        run["tokens"] = torch.cat([run["tokens"], choice[:, None]], dim=1)
        run["token_lps"] = torch.cat([run["token_lps"], log_probs.gather(1, choice[:, None])], dim=1)
        done = choice == specials.eos  # (N,)
        if bool(done.any()):
            _finish_rows(run, done, results)
            keep = (~done).nonzero().flatten()  # (N',)
            run = {name: rows[keep] for name, rows in run.items()}
            if keep.numel() > 0:
                state = scorer.select(state, keep)
        t += 1
    return [[h for h in results[s * copies : (s + 1) * copies] if h is not None] for s in range(batch)]


def _finish_rows(run: dict[str, Tensor], done: Tensor, results: list[Hypothesis | None]) -> None:
    """The rows that just emitted EOS (`done` (N,)) become hypotheses in their output slots."""
    ended = done.nonzero().flatten()
    ended_tokens, ended_lps = run["tokens"][ended, 1:].tolist(), run["token_lps"][ended].tolist()
    totals = run["token_lps"][ended].double().sum(dim=1).tolist()
    links = run["links"][ended].tolist() if "links" in run else [None] * len(totals)
    for slot, toks, lps, total, link in zip(run["slot"][ended].tolist(), ended_tokens, ended_lps, totals, links):
        results[slot] = Hypothesis(toks, score=total, log_prob=total, token_log_probs=lps, alignment=link)


def greedy_search(
    scorer: Scorer,
    src: Tensor,
    *,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    max_len_limit: int = 1024,
    min_len: int = 0,
    specials: Specials = Specials(),
    prefix: Sequence[Sequence[int]] | None = None,
    alignment: bool = False,
) -> list[list[Hypothesis]]:
    """The most probable next token at every step; one hypothesis per sentence.

    Scores are plain log-probs. Equals `beam_search(beam_size=1)` token for token whenever
    that beam search stops at its first finished hypothesis (see `beam_search`).
    """
    return _decode_rows(
        scorer, src, 1, _argmax, max_len_a, max_len_b, max_len_limit, min_len, specials, prefix, alignment
    )


def _argmax(log_probs: Tensor) -> Tensor:
    return log_probs.argmax(dim=1)


def _outside_nucleus(probs: Tensor, ranked: tuple[Tensor, Tensor], top_p: float) -> Tensor:
    """Mask (N, V) of tokens outside the top-p nucleus, given the best tokens of each row
    best first (values, indices; all of them or the first k)."""
    best, order = ranked
    kept = best.cumsum(dim=1) - best < top_p  # mass of strictly better tokens below p
    return torch.ones_like(probs, dtype=torch.bool).scatter(1, order, ~kept)


def filter_logits(log_probs: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Tempered, truncated logits to sample from: what `sample` draws with.

    log_probs (N, V). Temperature divides first; top_k keeps the k best (0: all; ties
    at the k-th value are all kept); top_p keeps the smallest set of best tokens whose
    tempered probability reaches top_p (1.0: all). Removed tokens get -inf.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (use greedy_search for argmax)")
    logits = log_probs / temperature  # (N, V)
    if 0 < top_k < logits.size(1):
        kth = logits.topk(top_k, dim=1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p < 1.0:
        probs = logits.softmax(dim=1)  # (N, V)
        drop = _outside_nucleus(probs, probs.topk(min(64, probs.size(1)), dim=1), top_p)  # nuclei are mostly small
        wide = (probs.masked_fill(drop, 0.0).sum(dim=1) < top_p).nonzero().flatten()  # rows reaching past the 64 best
        if wide.numel() > 0:
            drop[wide] = _outside_nucleus(probs[wide], probs[wide].sort(dim=1, descending=True), top_p)
        logits = logits.masked_fill(drop, NEG_INF)
    return logits


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row of probs (N, V) by inverting its CDF with one uniform per row.

    Same distribution as ``torch.multinomial(probs, 1)``, which on CPU draws an exponential
    for every vocabulary entry: 60% of sampling time at V=8k, against a cumsum here.
    """
    cdf = probs.float().cumsum(dim=1)  # (N, V)
    u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device) * cdf[:, -1:]  # (N, 1)
    # right=True: the first entry whose CDF exceeds u, which has probability > 0
    return torch.searchsorted(cdf, u, right=True).clamp_max(probs.size(1) - 1).squeeze(1)


def sample(
    scorer: Scorer,
    src: Tensor,
    *,
    n: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    max_len_limit: int = 1024,
    min_len: int = 0,
    specials: Specials = Specials(),
    prefix: Sequence[Sequence[int]] | None = None,
    alignment: bool = False,
) -> list[list[Hypothesis]]:
    """`n` independent samples per sentence (e.g. for back-translation).

    Tokens are drawn from `filter_logits`; a hypothesis's log_prob and token_log_probs
    are the model's own (untempered, unfiltered), so they can be compared with search.
    Pass a seeded `generator` (on src's device) for reproducible samples.
    """

    def choose(log_probs: Tensor) -> Tensor:
        return draw(filter_logits(log_probs, temperature, top_k, top_p).softmax(dim=1), generator)  # (N,)

    return _decode_rows(
        scorer, src, n, choose, max_len_a, max_len_b, max_len_limit, min_len, specials, prefix, alignment
    )


# ------------------------------------------------------------------------- beam search


@dataclass
class _Beams:
    """What a beam search carries between steps. Rows N = B' * width: row r belongs to running
    sentence r // width (width is 1 before the first step has chosen `beam` tokens, then beam)."""

    sentences: Tensor  # (B',) input index of each running sentence
    max_len: Tensor  # (B',)
    tokens: Tensor  # (N, t+1) BOS and the tokens so far
    token_lps: Tensor  # (N, t)
    scores: Tensor  # (N,) running log-probs
    best_finished: Tensor  # (B', n_best) best finished scores so far, sorted, -inf padded
    n_finished: Tensor  # (B',) hypotheses finished so far
    state: Any  # the scorer's
    prefix: Tensor  # (B', P) forced prefix of each sentence, PAD after its end
    prefix_len: Tensor  # (B',)
    progress: list[Progress] | None  # (N,) each row's lexical constraints; None: no sentence has any
    src_real: Tensor | None = None  # (B', S) source positions alignments may point to; None: no alignments
    links: Tensor | None = None  # (N, t) per token so far, the source position its step attended most
    attended: Tensor | None = None  # (N,) the same for this step's next token, one per row

    @property
    def width(self) -> int:
        return self.tokens.size(0) // self.sentences.numel()


@dataclass
class _Candidates:
    """A step's best extensions of every running sentence, best first: (B', C) each."""

    score: Tensor  # running log-prob after the token
    row: Tensor  # the extended row (in N)
    token: Tensor
    token_lp: Tensor  # log-prob of the token alone


def _start_beams(
    scorer: Scorer,
    src: Tensor,
    n_best: int,
    max_len: Tensor,
    prefix: Sequence[Sequence[int]] | None,
    constraints: Sequence[Sequence[Sequence[int]]] | None,
    alignment: bool,
    specials: Specials,
) -> _Beams:
    """One row per sentence holding BOS: all of a sentence's beams would be the same prefix."""
    batch, device = src.size(0), src.device
    progress = [Progress.start(c) for c in constraints] if constraints is not None else []
    if constraints is not None and len(progress) != batch:
        raise ValueError(f"{len(progress)} constraint lists for {batch} sentences")
    forced, forced_len = _prefixes(prefix, max_len)
    return _Beams(
        sentences=torch.arange(batch, device=device),
        max_len=max_len,
        tokens=torch.full((batch, 1), specials.bos, dtype=torch.long, device=device),
        token_lps=torch.zeros(batch, 0, device=device),
        scores=torch.zeros(batch, device=device),
        best_finished=torch.full((batch, n_best), NEG_INF, dtype=torch.float64, device=device),
        n_finished=torch.zeros(batch, dtype=torch.long, device=device),
        state=scorer.start(src),
        prefix=forced,
        prefix_len=forced_len,
        progress=progress if any(p.phrases for p in progress) else None,
        src_real=_real_tokens(src, specials) if alignment else None,
        links=torch.zeros(batch, 0, dtype=torch.long, device=device) if alignment else None,
    )


def _widen(scorer: Scorer, beams: _Beams, log_probs: Tensor, k: int) -> Tensor:
    """At the first step over a vocabulary under 2k: k copies of each row, all but one dead,
    so that ranking always finds k live candidates. Returns the copies' log-probs."""
    if beams.width >= k or log_probs.size(1) >= 2 * k:
        return log_probs
    running, device = beams.sentences.numel(), log_probs.device
    copies = torch.arange(beams.tokens.size(0), device=device).repeat_interleave(k)
    beams.tokens, beams.token_lps = beams.tokens[copies], beams.token_lps[copies]
    beams.state = scorer.select(beams.state, copies)
    if beams.progress is not None:
        beams.progress = [beams.progress[i] for i in copies.tolist()]
    if beams.links is not None:
        beams.links, beams.attended = beams.links[copies], beams.attended[copies]  # type: ignore[index]
    scores = torch.full((running, k), NEG_INF, device=device)
    scores[:, 0] = 0.0
    beams.scores = scores.view(-1)
    return log_probs[copies]


def _rank(beams: _Beams, log_probs: Tensor, k: int, specials: Specials) -> _Candidates:
    """Each sentence's best 2k extensions by running log-prob, without a pass over all
    width * V of them: a sentence's best 2k are among the best 2k tokens of each of its rows.
    Under constraints they are ranked again by `_allocate`."""
    running, width = beams.sentences.numel(), beams.width
    row_top, row_token = log_probs.topk(min(2 * k, log_probs.size(1)), dim=1)  # (N, c)
    token_lp = row_top.view(running, -1)  # (B', width * c)
    per_row = row_top.size(1)
    candidates = beams.scores.view(running, width).repeat_interleave(per_row, dim=1) + token_lp
    top, flat = candidates.topk(min(2 * k, candidates.size(1)), dim=1)  # (B', 2k)
    row = flat // per_row + torch.arange(running, device=top.device)[:, None] * width
    cands = _Candidates(top, row, row_token.view(running, -1).gather(1, flat), token_lp.gather(1, flat))
    return cands if beams.progress is None else _allocate(beams, cands, log_probs, k, specials)


def _beam_rules(beams: _Beams, log_probs: Tensor, t: int, min_len: int, specials: Specials) -> Tensor:
    """This step's log-probs (N, V) under the search's rules, in place: lengths (`_constrain`),
    forced prefixes, and EOS held back from rows whose constraints are not all met until
    the length limit forces it."""
    width = beams.width
    max_len = beams.max_len.repeat_interleave(width)  # (N,)
    log_probs = _constrain(log_probs, t, min_len, max_len, specials)
    prefix, prefix_len = beams.prefix.repeat_interleave(width, dim=0), beams.prefix_len.repeat_interleave(width)
    log_probs = _force_prefix(log_probs, t, prefix, prefix_len)
    if beams.progress is not None:
        unmet = torch.tensor([not p.done for p in beams.progress], device=log_probs.device)
        log_probs[unmet & (t + 1 < max_len), specials.eos] = NEG_INF
    return log_probs


def _finish(
    beams: _Beams,
    cands: _Candidates,
    t: int,
    k: int,
    penalty: Callable[[int], float],
    eos: int,
    finished: list[list[Hypothesis]],
) -> None:
    """Finalisation: EOS among a sentence's first k candidates, with a finite log-prob, is a
    finished hypothesis scored log_prob / penalty(t + 1) (fairseq's rule)."""
    top = cands.score[:, :k]
    new_finished = (cands.token[:, :k] == eos) & torch.isfinite(top)  # (B', k)
    if not bool(new_finished.any()):
        return
    new_scores = top.double() / penalty(t + 1)  # (B', k)
    which, rank = new_finished.nonzero().unbind(1)
    rows = cands.row[which, rank]
    prefixes, prefix_lps = beams.tokens[rows, 1:].tolist(), beams.token_lps[rows].tolist()
    links = [None] * rows.numel()
    if beams.links is not None:
        links = torch.cat([beams.links[rows], beams.attended[rows, None]], dim=1).tolist()  # type: ignore[index]
    for i, j, row, toks, lps, link in zip(which.tolist(), rank.tolist(), rows.tolist(), prefixes, prefix_lps, links):
        finished[int(beams.sentences[i])].append(
            Hypothesis(
                tokens=toks + [eos],
                score=float(new_scores[i, j]),
                log_prob=float(top[i, j]),
                token_log_probs=lps + [float(cands.token_lp[i, j])],
                constraints_met=beams.progress is None or beams.progress[row].done,
                alignment=link,
            )
        )
    entering = new_scores.masked_fill(~new_finished, NEG_INF)
    beams.best_finished = (
        torch.cat([beams.best_finished, entering], dim=1).topk(beams.best_finished.size(1), dim=1).values
    )
    beams.n_finished = beams.n_finished + new_finished.sum(dim=1)


def _options(
    beams: _Beams, cands: _Candidates, log_probs: Tensor, i: int, best_token: list[int], eos: int
) -> list[tuple[float, int, int, float]]:
    """Running sentence i's extensions to rank under constraints, each (row, token) once, as
    (running log-prob, row, token, token log-prob): its plain candidates, and for each live
    row the tokens that advance its constraints, its best token and EOS (possible only once
    its constraints are met, see `_beam_rules`)."""
    found = {}
    columns = (cands.score[i], cands.row[i], cands.token[i], cands.token_lp[i])
    for score, row, token, lp in zip(*(c.tolist() for c in columns)):
        if score > NEG_INF:
            found[(row, token)] = (score, lp)
    for row in range(i * beams.width, (i + 1) * beams.width):
        wanted = sorted(beams.progress[row].next_tokens() | {best_token[row], eos})  # type: ignore[index]
        lps = log_probs[row, wanted]
        for token, score, lp in zip(wanted, (beams.scores[row] + lps).tolist(), lps.tolist()):
            if score > NEG_INF:
                found.setdefault((row, token), (score, lp))
    return [(score, row, token, lp) for (row, token), (score, lp) in found.items()]


def _allocate(beams: _Beams, cands: _Candidates, log_probs: Tensor, k: int, specials: Specials) -> _Candidates:
    """Ranking under constraints (B', C): every sentence with constraints ranks its `_options`
    by dynamic beam allocation (`constraints.allocate`), banked by the constraint tokens
    each would have met, so that `_finish` (EOS among the first k) and `_first_live` read
    the new order as they read plain ranks (as fairseq's constrained search). Sentences
    without constraints keep their plain ranks. Rows end with k dead (-inf) candidates, so
    that k live ones always exist."""
    progress, width = beams.progress, beams.width
    plain = [c.tolist() for c in (cands.score, cands.row, cands.token, cands.token_lp)]
    best_token = log_probs.argmax(dim=1).tolist()
    ranked = []
    for i in range(beams.sentences.numel()):
        if progress[i * width].total == 0:  # type: ignore[index]
            ranked.append(list(zip(*(c[i] for c in plain))))
            continue
        options = _options(beams, cands, log_probs, i, best_token, specials.eos)
        banks = [progress[row].advance(token).count for _, row, token, _ in options]  # type: ignore[index]
        ranked.append([options[j] for j in allocate([o[0] for o in options], banks, len(options))])
    columns = max(len(r) for r in ranked) + k
    rows = [r + [(NEG_INF, i * width, specials.pad, NEG_INF)] * (columns - len(r)) for i, r in enumerate(ranked)]
    fields = [[[option[f] for option in r] for r in rows] for f in range(4)]  # per field: (B', C)
    dtypes = (cands.score.dtype, torch.long, torch.long, cands.token_lp.dtype)
    return _Candidates(*(torch.tensor(f, dtype=d, device=cands.score.device) for f, d in zip(fields, dtypes)))


def _advance(beams: _Beams, cands: _Candidates, live: Tensor) -> Tensor:
    """Expansion: the candidates at columns `live` (B', k) become the next beams. Returns the
    row (in the old N) each new row extends, for the scorer's state."""
    source_row = cands.row.gather(1, live).view(-1)  # (N,)
    token = cands.token.gather(1, live).view(-1, 1)  # (N, 1)
    beams.tokens = torch.cat([beams.tokens[source_row], token], dim=1)  # (N, t+2)
    beams.token_lps = torch.cat([beams.token_lps[source_row], cands.token_lp.gather(1, live).view(-1, 1)], dim=1)
    beams.scores = cands.score.gather(1, live).view(-1)
    if beams.progress is not None:
        beams.progress = [beams.progress[r].advance(x) for r, x in zip(source_row.tolist(), token.view(-1).tolist())]
    if beams.links is not None:
        beams.links = torch.cat([beams.links[source_row], beams.attended[source_row, None]], dim=1)  # type: ignore[index]
    return source_row


def _keep_running(scorer: Scorer, beams: _Beams, done: Tensor, source_row: Tensor) -> None:
    """Drop the sentences that are `done` (B',) and move the scorer's state to the new rows."""
    keep_rows = (~done).repeat_interleave(beams.width)  # (N,)
    beams.sentences, beams.max_len = beams.sentences[~done], beams.max_len[~done]
    beams.best_finished, beams.n_finished = beams.best_finished[~done], beams.n_finished[~done]
    beams.tokens, beams.token_lps = beams.tokens[keep_rows], beams.token_lps[keep_rows]
    beams.scores = beams.scores[keep_rows]
    beams.prefix, beams.prefix_len = beams.prefix[~done], beams.prefix_len[~done]
    if beams.progress is not None:
        beams.progress = [p for p, keep in zip(beams.progress, keep_rows.tolist()) if keep]
    if beams.links is not None:
        beams.links, beams.src_real = beams.links[keep_rows], beams.src_real[~done]  # type: ignore[index]
    if beams.sentences.numel() > 0:
        beams.state = scorer.select(beams.state, source_row[keep_rows])


def _first_live(is_eos: Tensor, beam: int) -> Tensor:
    """Column indices of the first `beam` non-EOS candidates of each row, in rank order.

    is_eos (B, C) with candidates sorted best first; returns (B, beam).
    """
    columns = is_eos.size(1)
    key = is_eos.long() * columns + torch.arange(columns, device=is_eos.device)  # (B, C) EOS sorts last
    return key.argsort(dim=1)[:, :beam]


def _sentences_done(beams: _Beams, length: int, k: int, alpha: float, style: str, early_stop: str) -> Tensor:
    """Which running sentences can stop (B',), their live beams holding `length` tokens.

    * A sentence always stops after the step at its maximum length (EOS was forced on every
      live beam) or when no beam has a finite log-prob left;
    * otherwise it needs at least `k` finished hypotheses (fairseq's rule), and with
      ``early_stop="exact"`` also that no live beam can still enter the n-best: log-probs
      only decrease, so a live beam's best reachable score is its log-prob divided by the
      largest penalty reachable for lengths up to the maximum (penalties are monotone in
      length, so that is one of the two ends of the range); the sentence stops once this
      bound is <= the n_best-th best finished score. ``early_stop="fairseq"`` skips that
      check: cheaper, and identical whenever the penalty does not grow with length (style
      "none", or alpha <= 0).
    """
    live_log_probs, best_finished, max_len = beams.scores.view(-1, k), beams.best_finished, beams.max_len
    best_live = live_log_probs.max(dim=1).values.double()  # (B',)
    done = (max_len <= length) | (best_live == NEG_INF)  # EOS was forced everywhere, or nothing is alive
    enough = beams.n_finished >= k
    if early_stop == "fairseq":
        return done | enough
    # Over lengths length+1 .. max_len the penalty is monotone, so x / lp(L) peaks at an end.
    bound = torch.maximum(best_live / _penalty(length + 1, alpha, style), best_live / _penalty(max_len, alpha, style))
    return done | (enough & (bound <= best_finished[:, -1]))


def beam_search(
    scorer: Scorer,
    src: Tensor,
    *,
    beam_size: int = 5,
    n_best: int = 1,
    length_penalty: float = 1.0,
    lp_style: str = "gnmt",
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    max_len_limit: int = 1024,
    min_len: int = 0,
    early_stop: str = "exact",
    specials: Specials = Specials(),
    prefix: Sequence[Sequence[int]] | None = None,
    constraints: Sequence[Sequence[Sequence[int]]] | None = None,
    alignment: bool = False,
) -> list[list[Hypothesis]]:
    """Beam search over all sentences at once; `n_best` hypotheses each, best first.

    Each step every sentence ranks its beam * V extensions by running log-prob (by banks
    under constraints) and keeps the best 2 * beam (`_rank`): among the first `beam` of them, those ending in EOS become
    finished hypotheses with score log_prob / length_penalty(len incl. EOS) (`_finish`, the
    rule fairseq uses); the first `beam` not ending in EOS are the next beams (`_advance`).
    Taking 2 * beam guarantees `beam` live candidates, as at most one EOS comes from each
    beam. The first step runs one row per sentence (all its beams would be the same BOS
    prefix) and then expands to `beam` rows; a vocabulary smaller than 2 * beam instead
    starts with `beam` copies of which all but one hold -inf (`_widen`). Sentences stop by
    the rule of `_sentences_done` and leave the batch.

    With beam_size=1 and ``early_stop="fairseq"``, or with a non-growing penalty, this is
    greedy search. With a growing penalty the exact rule can keep a beam running after a
    finished hypothesis and so may find a better-scoring output than greedy.

    ``constraints`` and ``alignment``: see the module notes. A sentence returns fewer than
    `n_best` hypotheses only if fewer sequences have a nonzero probability under the rules.
    """
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"need 1 <= n_best ({n_best}) <= beam_size ({beam_size})")
    if early_stop not in ("exact", "fairseq"):
        raise ValueError(f"unknown early_stop {early_stop!r} (exact | fairseq)")
    alpha, style, k = length_penalty, lp_style, beam_size
    max_len = max_lengths(_src_lengths(src, specials), max_len_a, max_len_b, max_len_limit)  # (B,)
    beams = _start_beams(scorer, src, n_best, max_len, prefix, constraints, alignment, specials)
    finished: list[list[Hypothesis]] = [[] for _ in range(src.size(0))]
    t = 0
    while beams.sentences.numel() > 0:
        log_probs, beams.state = scorer.step(beams.state, beams.tokens)
        if beams.src_real is not None:
            beams.attended = _attended(scorer, beams.state, beams.src_real.repeat_interleave(beams.width, dim=0))
        log_probs = _widen(scorer, beams, log_probs, k)
        log_probs = _beam_rules(beams, log_probs, t, min_len, specials)  # (N, V)
        cands = _rank(beams, log_probs, k, specials)
        _finish(beams, cands, t, k, lambda n: _penalty(n, alpha, style), specials.eos, finished)
        source_row = _advance(beams, cands, _first_live(cands.token == specials.eos, k))
        done = _sentences_done(beams, t + 1, k, alpha, style, early_stop)
        _keep_running(scorer, beams, done, source_row)
        t += 1
    return [sorted(hyps, key=lambda h: (h.constraints_met, h.score), reverse=True)[:n_best] for hyps in finished]
