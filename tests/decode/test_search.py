"""Search is checked against scorers whose distributions are known, so that the right
answer can be computed independently (by enumerating every sequence, or by rescoring
with teacher forcing) instead of trusting the search to grade itself."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

from transformer.decode.search import (
    BOS,
    EOS,
    PAD,
    Ensemble,
    Hypothesis,
    beam_search,
    draw,
    filter_logits,
    greedy_search,
    length_penalty,
    max_lengths,
    sample,
)

A, B = 4, 5  # the two ordinary target words of the scripted vocabulary
VOCAB = 6  # PAD UNK BOS EOS A B

Dist = Callable[[tuple[int, ...]], dict[int, float]]  # (source key, *generated) -> probs


class Scripted:
    """Scorer reading next-token probabilities from `dist`, keyed by (src[:, 0], *generated).

    Uncached: every step looks at the whole prefix, so it also checks that search hands
    over the right prefix for each row. Records the number of rows of every step.
    """

    def __init__(self, dist: Dist) -> None:
        self.dist = dist
        self.rows: list[int] = []

    def start(self, src: torch.Tensor) -> torch.Tensor:
        return src[:, 0].clone()

    def select(self, state: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return state[index]

    def step(self, state: torch.Tensor, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert bool((prefix[:, 0] == BOS).all())
        self.rows.append(prefix.size(0))
        probs = torch.zeros(prefix.size(0), VOCAB)
        for i, (key, row) in enumerate(zip(state.tolist(), prefix.tolist())):
            for token, p in self.dist((key, *row[1:])).items():
                probs[i, token] = p
        return probs.log(), state


def random_dist(seed: int, eos_bias: float = 0.0) -> Dist:
    """A fixed random distribution over {EOS, A, B} for every prefix (no ties in practice)."""

    def dist(key: tuple[int, ...]) -> dict[int, float]:
        rng = random.Random(f"{seed}:{key}")
        weights = [rng.random() + eos_bias, rng.random(), rng.random()]
        total = sum(weights)
        return {EOS: weights[0] / total, A: weights[1] / total, B: weights[2] / total}

    return dist


def table_dist(table: dict[tuple[int, ...], dict[int, float]]) -> Dist:
    """Distributions from a table; prefixes not in it end at once (EOS with probability 1)."""
    return lambda key: table.get(key, {EOS: 1.0})


def brute_force(dist: Dist, key: int, max_len: int, min_len: int = 0) -> list[tuple[list[int], float]]:
    """Every sequence with nonzero probability under the search's length rules, with its log-prob."""
    out: list[tuple[list[int], float]] = []

    def walk(prefix: list[int], log_prob: float) -> None:
        t = len(prefix)
        for token, p in dist((key, *prefix)).items():
            if p <= 0:
                continue
            if token == EOS:
                if t >= min_len or t + 1 >= max_len:
                    out.append((prefix + [EOS], log_prob + math.log(p)))
            elif t + 1 < max_len:
                walk(prefix + [token], log_prob + math.log(p))

    walk([], 0.0)
    return out


Ranked = list[tuple[list[int], float]]


def best(seqs: Ranked, alpha: float, style: str, n: int) -> Ranked:
    """The n best sequences by length-penalised score, with that score."""
    ranked = [(toks, lp / length_penalty(len(toks), alpha, style)) for toks, lp in seqs]
    return sorted(ranked, key=lambda x: x[1], reverse=True)[:n]


def src_of(*keys: int) -> torch.Tensor:
    """A batch whose row i has source key keys[i] (one token, so max length = b)."""
    return torch.tensor(keys)[:, None]


class TinyModel:
    """A small random 'NMT model': mean source embedding + sum of prefix embeddings -> logits.

    Its distributions depend on the source content and the whole prefix; an EOS bias that
    grows with position makes outputs end at varied lengths. `cached` keeps a running
    prefix sum and reads only prefix[:, -1], like a key/value cache.
    """

    def __init__(self, seed: int, vocab: int = 8, dim: int = 8, cached: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.src_emb = torch.randn(vocab, dim, generator=g)
        self.tgt_emb = torch.randn(vocab, dim, generator=g)
        self.out = torch.randn(dim, vocab, generator=g) * 1.5
        self.cached = cached

    def start(self, src: torch.Tensor) -> Any:
        mask = (src != PAD).unsqueeze(-1).float()  # (B, S, 1)
        context = (self.src_emb[src] * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, D)
        return (context, torch.zeros_like(context)) if self.cached else context

    def select(self, state: Any, index: torch.Tensor) -> Any:
        return tuple(s[index] for s in state) if self.cached else state[index]

    def step(self, state: Any, prefix: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if self.cached:
            context, acc = state
            acc = acc + self.tgt_emb[prefix[:, -1]]  # (N, D)
            state = (context, acc)
        else:
            context, acc = state, self.tgt_emb[prefix].sum(1)  # (N, D)
        logits = torch.tanh(context + 0.5 * acc) @ self.out  # (N, V)
        logits[:, EOS] += 0.8 * prefix.size(1) - 3.0
        return logits.log_softmax(-1), state


def padded(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [PAD] * (width - len(r)) for r in rows])


SOURCES = padded([[4, 5, 6], [7], [5, 5, 7, 6, 4], [6, 4]])


def rescore(scorer: Any, src_row: torch.Tensor, tokens: list[int]) -> list[float]:
    """Teacher-forced log-prob of each token of a hypothesis, one step at a time."""
    state = scorer.start(src_row[None])
    prefix = torch.tensor([[BOS]])
    out = []
    for token in tokens:
        log_probs, state = scorer.step(state, prefix)
        out.append(float(log_probs[0, token]))
        prefix = torch.cat([prefix, torch.tensor([[token]])], dim=1)
    return out


def same(a: list[Hypothesis], b: list[Hypothesis], tol: float = 1e-5) -> None:
    """Two hypothesis lists: identical tokens, equal scores up to float rounding."""
    assert [h.tokens for h in a] == [h.tokens for h in b]
    for x, y in zip(a, b):
        assert x.log_prob == pytest.approx(y.log_prob, abs=tol)
        assert x.score == pytest.approx(y.score, abs=tol)


# ------------------------------------------------------------------------------ helpers


def test_max_lengths_and_length_penalty() -> None:
    lengths = max_lengths(torch.tensor([0, 2, 4, 100]), a=1.5, b=1, limit=50)
    assert lengths.tolist() == [1, 4, 7, 50]
    assert length_penalty(7, 1.0, "gnmt") == pytest.approx(2.0)
    assert length_penalty(4, 0.5, "average") == pytest.approx(2.0)
    assert length_penalty(9, 2.0, "none") == 1.0
    as_tensor = length_penalty(torch.tensor([1, 7]), 1.0, "gnmt")
    assert torch.allclose(as_tensor, torch.tensor([1.0, 2.0], dtype=torch.float64))


# ------------------------------------------------------------------------- beam search


@pytest.mark.parametrize(
    "alpha, style, min_len",
    [(1.0, "none", 0), (1.0, "gnmt", 0), (1.0, "average", 0), (0.6, "gnmt", 2), (2.0, "gnmt", 0)],
)
def test_beam_finds_brute_force_best(alpha: float, style: str, min_len: int) -> None:
    # 31 sequences of length <= 5; a beam of 32 keeps every prefix, so beam search must
    # return exactly the enumerated best, in order, with the enumerated scores.
    dist = random_dist(seed=1)
    results = beam_search(
        Scripted(dist),
        src_of(11, 12),
        beam_size=32,
        n_best=6,
        length_penalty=alpha,
        lp_style=style,
        max_len_a=0.0,
        max_len_b=5,
        min_len=min_len,
    )
    for key, hyps in zip((11, 12), results):
        expected = best(brute_force(dist, key, max_len=5, min_len=min_len), alpha, style, 6)
        assert [h.tokens for h in hyps] == [toks for toks, _ in expected]
        for h, (toks, score) in zip(hyps, expected):
            assert h.score == pytest.approx(score, abs=1e-5)
            assert h.log_prob == pytest.approx(score * length_penalty(len(toks), alpha, style), abs=1e-5)


# After "A": A is likely; after "A A A A": EOS is likely. Stopping at once ("EOS", p=.55)
# beats "A A A A EOS" (p=.45 * .99**4) on log-prob, but not once length is rewarded.
LONG_WINS = table_dist(
    {
        (0,): {EOS: 0.55, A: 0.45},
        (0, A): {A: 0.99, EOS: 0.01},
        (0, A, A): {A: 0.99, EOS: 0.01},
        (0, A, A, A): {A: 0.99, EOS: 0.01},
        (0, A, A, A, A): {EOS: 0.99, A: 0.01},
    }
)


def test_shorter_wins_without_penalty() -> None:
    hyps = beam_search(Scripted(LONG_WINS), src_of(0), beam_size=2, length_penalty=0.0, max_len_a=0, max_len_b=10)
    assert hyps[0][0].tokens == [EOS]
    assert hyps[0][0].score == pytest.approx(math.log(0.55), abs=1e-6)


@pytest.mark.parametrize("style", ["gnmt", "average"])
def test_longer_wins_with_growing_penalty(style: str) -> None:
    hyps = beam_search(
        Scripted(LONG_WINS), src_of(0), beam_size=2, length_penalty=1.0, lp_style=style, max_len_a=0, max_len_b=10
    )
    assert hyps[0][0].tokens == [A, A, A, A, EOS]
    expected = best(brute_force(LONG_WINS, 0, max_len=10), 1.0, style, 1)[0]
    assert hyps[0][0].score == pytest.approx(expected[1], abs=1e-5)


def test_exact_stop_outlives_fairseq_stop() -> None:
    # Both rules have `beam` finished ("EOS", "A EOS") after two steps; only the exact rule
    # sees that the live "A A" can still win under gnmt, so fairseq's rule settles for "EOS".
    kwargs = dict(beam_size=2, length_penalty=1.0, lp_style="gnmt", max_len_a=0, max_len_b=10)
    exact = beam_search(Scripted(LONG_WINS), src_of(0), **kwargs)
    fairseq = beam_search(Scripted(LONG_WINS), src_of(0), early_stop="fairseq", **kwargs)
    assert exact[0][0].tokens == [A, A, A, A, EOS]
    assert fairseq[0][0].tokens == [EOS]


@pytest.mark.parametrize(
    "alpha, style, early_stop",
    [(1.0, "none", "exact"), (0.0, "gnmt", "exact"), (1.0, "gnmt", "fairseq"), (2.0, "average", "fairseq")],
)
def test_beam_of_one_is_greedy(alpha: float, style: str, early_stop: str) -> None:
    src = src_of(1, 2, 3, 4, 5, 6)
    for dist in (random_dist(seed=3), random_dist(seed=4, eos_bias=0.5)):
        greedy = greedy_search(Scripted(dist), src, max_len_a=0, max_len_b=6)
        beam = beam_search(
            Scripted(dist),
            src,
            beam_size=1,
            length_penalty=alpha,
            lp_style=style,
            early_stop=early_stop,
            max_len_a=0,
            max_len_b=6,
        )
        for g, b in zip(greedy, beam):
            assert g[0].tokens == b[0].tokens
            assert g[0].log_prob == pytest.approx(b[0].log_prob, abs=1e-5)
    model = TinyModel(seed=0)
    greedy = greedy_search(model, SOURCES)
    beam = beam_search(model, SOURCES, beam_size=1, length_penalty=alpha, lp_style=style, early_stop=early_stop)
    assert [g[0].tokens for g in greedy] == [b[0].tokens for b in beam]


def test_beam_of_one_with_exact_gnmt_may_beat_greedy() -> None:
    # Documented divergence: the exact rule keeps the second-best continuation alive.
    greedy = greedy_search(Scripted(LONG_WINS), src_of(0), max_len_a=0, max_len_b=10)
    beam = beam_search(Scripted(LONG_WINS), src_of(0), beam_size=1, max_len_a=0, max_len_b=10)
    assert greedy[0][0].tokens == [EOS]
    assert beam[0][0].tokens == [A, A, A, A, EOS]


def test_min_len_forbids_early_eos() -> None:
    dist = random_dist(seed=5, eos_bias=3.0)  # EOS is very likely everywhere
    src = src_of(1, 2)
    runs = [
        greedy_search(Scripted(dist), src, min_len=3, max_len_a=0, max_len_b=8),
        beam_search(Scripted(dist), src, beam_size=3, n_best=3, min_len=3, max_len_a=0, max_len_b=8),
    ]
    for run in runs:
        for hyps in run:
            # EOS as soon as it is allowed
            assert hyps and all(len(h.tokens) == 4 and h.tokens[-1] == EOS for h in hyps)
    samples = sample(
        Scripted(dist), src, n=20, min_len=3, max_len_a=0, max_len_b=8, generator=torch.Generator().manual_seed(0)
    )
    for hyps in samples:  # never before it is allowed, mostly as soon as it is
        assert len(hyps) == 20 and all(len(h.tokens) >= 4 and h.tokens.index(EOS) == len(h.tokens) - 1 for h in hyps)
        assert sum(len(h.tokens) == 4 for h in hyps) >= 10
    without = greedy_search(Scripted(dist), src, max_len_a=0, max_len_b=8)
    assert all(hyps[0].tokens == [EOS] for hyps in without)


def test_max_length_forces_eos() -> None:
    never_ends = lambda key: {EOS: 0.01, A: 0.6, B: 0.39}  # noqa: E731
    src = padded([[4, 5], [4, 5, 6, 7]])  # max length floor(1.5 * len + 1): 4 and 7
    greedy = greedy_search(Scripted(never_ends), src, max_len_a=1.5, max_len_b=1)
    beam = beam_search(Scripted(never_ends), src, beam_size=3, n_best=3, max_len_a=1.5, max_len_b=1)
    for limit, g, b in zip((4, 7), greedy, beam):
        assert g[0].tokens == [A] * (limit - 1) + [EOS]
        assert g[0].log_prob == pytest.approx((limit - 1) * math.log(0.6) + math.log(0.01), abs=1e-5)
        assert len(b) == 3 and all(len(h.tokens) <= limit and h.tokens[-1] == EOS for h in b)


def test_impossible_continuations_are_safe() -> None:
    # Only one sequence has nonzero probability: no NaN, no -inf hypothesis, no crash.
    only_eos = table_dist({})
    hyps = beam_search(Scripted(only_eos), src_of(0, 1), beam_size=4, n_best=4)
    assert [[h.tokens for h in s] for s in hyps] == [[[EOS]], [[EOS]]]
    assert all(h.score == 0.0 for s in hyps for h in s)
    with pytest.raises(ValueError):
        beam_search(Scripted(only_eos), src_of(0), beam_size=2, n_best=3)


@pytest.mark.parametrize("cached", [False, True])
def test_batch_equals_sentences_alone(cached: bool) -> None:
    model = TinyModel(seed=1, cached=cached)
    kwargs = dict(beam_size=3, n_best=3, length_penalty=1.0, max_len_a=1.0, max_len_b=2)
    batched = beam_search(model, SOURCES, **kwargs)
    greedy = greedy_search(model, SOURCES, max_len_a=1.0, max_len_b=2)
    for i in range(SOURCES.size(0)):
        row = SOURCES[i : i + 1, : int((SOURCES[i] != PAD).sum())]  # unpadded, alone
        same(batched[i], beam_search(model, row, **kwargs)[0])
        same(greedy[i], greedy_search(model, row, max_len_a=1.0, max_len_b=2)[0])
    assert len({len(h[0].tokens) for h in batched}) > 1  # the sentences really end at different steps


def test_cached_equals_uncached() -> None:
    kwargs = dict(beam_size=4, n_best=4, length_penalty=0.6)
    uncached = beam_search(TinyModel(2), SOURCES, **kwargs)
    cached = beam_search(TinyModel(2, cached=True), SOURCES, **kwargs)
    for u, c in zip(uncached, cached):
        same(u, c)


def test_finished_sentences_leave_the_batch() -> None:
    # Sentence 0 must end at once, sentence 1 runs to its maximum of 6 tokens.
    dist = lambda key: {EOS: 1.0} if key[0] == 1 else {EOS: 0.01, A: 0.99}  # noqa: E731
    src = padded([[1], [2, 2, 2, 2, 2, 2]])
    beam, greedy = Scripted(dist), Scripted(dist)
    results = beam_search(beam, src, beam_size=2, max_len_a=1, max_len_b=0)
    assert beam.rows == [2] + [2] * 5  # the first step runs one row per sentence, then sentence 0 is gone
    assert [h[0].tokens for h in results] == [[EOS], [A] * 5 + [EOS]]  # still in input order
    greedy_search(greedy, src, max_len_a=1, max_len_b=0)
    assert greedy.rows == [2] + [1] * 5


def test_nbest_sorted_and_rescored() -> None:
    model = TinyModel(seed=3)
    results = beam_search(model, SOURCES, beam_size=5, n_best=5, length_penalty=1.0, lp_style="gnmt")
    for i, hyps in enumerate(results):
        assert len(hyps) == 5
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 5  # no duplicated beams
        for h in hyps:
            forced = rescore(model, SOURCES[i], h.tokens)
            assert h.token_log_probs == pytest.approx(forced, abs=1e-5)
            assert h.log_prob == pytest.approx(sum(forced), abs=1e-4)
            assert h.score == pytest.approx(h.log_prob / length_penalty(len(h.tokens), 1.0, "gnmt"), abs=1e-5)
            assert h.tokens[-1] == EOS and PAD not in h.tokens and BOS not in h.tokens


# ---------------------------------------------------------------------------- ensemble


def test_ensemble_of_copies_is_the_model() -> None:
    model = TinyModel(seed=4)
    alone = beam_search(model, SOURCES, beam_size=3, n_best=2)
    for members in ([model], [model, TinyModel(seed=4, cached=True)]):
        for a, e in zip(alone, beam_search(Ensemble(members), SOURCES, beam_size=3, n_best=2)):
            same(a, e)


def test_ensemble_averages_probabilities() -> None:
    m1, m2 = TinyModel(seed=5), TinyModel(seed=6, cached=True)
    ensemble = Ensemble([m1, m2])
    results = beam_search(ensemble, SOURCES, beam_size=3, n_best=3)
    for i, hyps in enumerate(results):
        for h in hyps:
            p1 = torch.tensor(rescore(m1, SOURCES[i], h.tokens)).exp()
            p2 = torch.tensor(rescore(m2, SOURCES[i], h.tokens)).exp()
            assert h.token_log_probs == pytest.approx(((p1 + p2) / 2).log().tolist(), abs=1e-5)
    prefix = torch.tensor([[BOS, 4, 5]] * SOURCES.size(0))
    lp, _ = ensemble.step(ensemble.start(SOURCES), prefix)
    assert torch.allclose(lp.exp().sum(1), torch.ones(SOURCES.size(0)), atol=1e-5)


# ---------------------------------------------------------------------------- sampling


def test_top_k_one_sampling_is_greedy() -> None:
    model = TinyModel(seed=7)
    greedy = greedy_search(model, SOURCES)
    sampled = sample(model, SOURCES, n=3, top_k=1, generator=torch.Generator().manual_seed(1))
    for g, s in zip(greedy, sampled):
        assert len(s) == 3
        for h in s:
            assert h.tokens == g[0].tokens
            assert h.log_prob == pytest.approx(g[0].log_prob, abs=1e-5)


def test_sampling_is_reproducible_and_scored_by_the_model() -> None:
    model = TinyModel(seed=8)

    def draw(seed: int) -> list[list[list[int]]]:
        hyps = sample(model, SOURCES, n=5, temperature=1.5, generator=torch.Generator().manual_seed(seed))
        for i, sentence in enumerate(hyps):
            for h in sentence:
                assert h.log_prob == pytest.approx(sum(rescore(model, SOURCES[i], h.tokens)), abs=1e-4)
        return [[h.tokens for h in s] for s in hyps]

    first = draw(0)
    assert draw(0) == first
    assert draw(1) != first
    assert len({tuple(t) for s in first for t in s}) > SOURCES.size(0)  # samples differ from each other


def test_filter_logits() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])

    def kept(**kw: Any) -> list[int]:
        return torch.isfinite(filter_logits(probs.log(), **kw))[0].nonzero().flatten().tolist()

    assert kept(top_p=0.4) == [1]  # smallest set reaching p: the 0.5 alone
    assert kept(top_p=0.7) == [1, 3]  # 0.5 + 0.3
    assert kept(top_p=0.9) == [1, 2, 3]  # 0.5 + 0.3 + 0.15
    assert kept(top_p=1.0) == [0, 1, 2, 3]
    assert kept(top_k=2) == [1, 3]
    renormalised = filter_logits(probs.log(), top_p=0.7).softmax(-1)
    assert torch.allclose(renormalised, torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    tempered = filter_logits(probs.log(), temperature=0.5).softmax(-1)
    assert torch.allclose(tempered, probs**2 / (probs**2).sum())


def test_top_p_sampling_draws_only_from_the_nucleus() -> None:
    dist = table_dist({(0,): {EOS: 0.1, A: 0.6, B: 0.3}})
    hyps = sample(Scripted(dist), src_of(0), n=60, top_p=0.8, generator=torch.Generator().manual_seed(2))[0]
    first = [h.tokens[0] for h in hyps]
    assert set(first) == {A, B}
    for h in hyps:
        assert h.log_prob == pytest.approx(math.log(0.6 if h.tokens[0] == A else 0.3), abs=1e-6)


def test_draw_follows_the_distribution_and_skips_impossible_tokens() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]]).repeat(20_000, 1)
    tokens = draw(probs, torch.Generator().manual_seed(3))
    first, second = tokens[0::2], tokens[1::2]
    assert (second == 0).all()
    counts = torch.bincount(first, minlength=6).float() / first.numel()
    assert counts[[0, 2, 5]].sum() == 0
    assert torch.allclose(counts, probs[0], atol=0.01)  # 20,000 draws: standard error <= 0.0036
    assert torch.equal(draw(probs, torch.Generator().manual_seed(3)), tokens)


def test_top_p_over_a_wide_nucleus_matches_a_full_sort() -> None:
    """Flat rows need more than the first 64 candidates: the nucleus is the same as sorting all."""
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(4)) * torch.tensor(
        [[0.1], [0.5], [1.0], [3.0], [8.0], [0.01]]
    )
    for p in (0.3, 0.9, 0.99):
        probs, order = logits.softmax(dim=1).sort(dim=1, descending=True)
        expected = torch.zeros_like(logits, dtype=torch.bool).scatter(1, order, probs.cumsum(dim=1) - probs < p)
        assert torch.equal(torch.isfinite(filter_logits(logits.log_softmax(dim=1), top_p=p)), expected)
        assert expected.sum(dim=1).max() > 64  # the flat rows reach past the first guess


def test_rows_select_moves_every_per_row_field_alike() -> None:
    """One ``select`` reorders every field of the per-row record (a new field is covered
    without touching the search), and the scorer's state with it."""
    from dataclasses import fields

    from transformer.decode.rows import NOT_PER_ROW, Rows
    from transformer.decode.spec import SearchSpec

    src = torch.tensor([[A, EOS, PAD], [B, A, EOS], [A, B, EOS]])
    spec = SearchSpec(alignment=True)
    rows = Rows.start(Scripted(random_dist(0)), src, spec, prefix=[[A], [], [B, A]], constraints=[[[A]], [[B]], []])
    rows.grow(torch.tensor([A, B, A]), torch.tensor([-0.5, -1.0, -1.5]))
    index = torch.tensor([2, 0, 0, 1])
    chosen = rows.select(index)
    per_row = [f.name for f in fields(Rows) if f.name not in NOT_PER_ROW]
    assert {"tokens", "constraints", "links", "src_real", "prefix"} <= set(per_row)
    for name in per_row:
        before, after = getattr(rows, name), getattr(chosen, name)
        if isinstance(before, torch.Tensor):
            assert torch.equal(after, before[index]), name
        else:
            assert after == [before[i] for i in index.tolist()], name
    assert chosen.state.tolist() == rows.state[index].tolist()  # Scripted's state: each row's source key
    assert rows.select(torch.tensor([], dtype=torch.long)).state is None  # no rows left: the scorer is not asked
