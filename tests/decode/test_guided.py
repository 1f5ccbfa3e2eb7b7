"""Guided search: forced prefixes and lexical constraints, checked on scripted scorers whose
best outputs under the guide are known by enumeration."""

from __future__ import annotations

import math

import pytest
import torch
from test_search import SOURCES, A, B, Scripted, TinyModel, brute_force, random_dist, same, src_of, table_dist

from transformer.decode.constraints import ConstraintState, allocate
from transformer.decode.search import EOS, PAD, beam_search, greedy_search, length_penalty, sample
from transformer.vocab import UNK

# Unforced, "A EOS" is best; forced to start with B, the search must go on to "B A EOS".
AFTER_B = table_dist(
    {
        (0,): {A: 0.6, B: 0.4},
        (0, A): {EOS: 0.9, A: 0.1},
        (0, B): {A: 0.7, EOS: 0.3},
        (0, B, A): {EOS: 1.0},
    }
)
LIMITS = dict(max_len_a=0.0, max_len_b=6)


def contains(tokens: list[int], phrase: list[int]) -> bool:
    return any(tokens[i : i + len(phrase)] == phrase for i in range(len(tokens)))


# ----------------------------------------------------------------------------- prefixes


def test_forced_prefix_changes_the_best_output_and_counts_in_the_score() -> None:
    assert greedy_search(Scripted(AFTER_B), src_of(0), **LIMITS)[0][0].tokens == [A, EOS]
    searches = {
        "greedy": lambda **kw: greedy_search(Scripted(AFTER_B), src_of(0), **LIMITS, **kw),
        "beam": lambda **kw: beam_search(Scripted(AFTER_B), src_of(0), beam_size=3, **LIMITS, **kw),
        "sample": lambda **kw: sample(Scripted(AFTER_B), src_of(0), top_k=1, **LIMITS, **kw),
    }
    for name, search in searches.items():
        hyp = search(prefix=[[B]])[0][0]
        assert hyp.tokens == [B, A, EOS], name
        assert hyp.token_log_probs[0] == pytest.approx(math.log(0.4)), name  # the forced token is scored
        assert hyp.log_prob == pytest.approx(math.log(0.4 * 0.7)), name


def test_prefixes_of_different_lengths_in_one_batch_equal_each_alone() -> None:
    prefixes = [[5, 5], [], [7], [4, 6, 6]]
    for cached in (False, True):
        model = TinyModel(seed=3, cached=cached)
        kwargs = dict(max_len_a=1.0, max_len_b=5)
        beams = beam_search(model, SOURCES, beam_size=3, n_best=3, prefix=prefixes, **kwargs)
        greedy = greedy_search(model, SOURCES, prefix=prefixes, **kwargs)
        for i, p in enumerate(prefixes):
            row = SOURCES[i : i + 1, : int((SOURCES[i] != PAD).sum())]
            same(beams[i], beam_search(model, row, beam_size=3, n_best=3, prefix=[p], **kwargs)[0])
            same(greedy[i], greedy_search(model, row, prefix=[p], **kwargs)[0])
            assert all(h.tokens[: len(p)] == p for h in beams[i] + greedy[i])
    uncached = beam_search(TinyModel(3), SOURCES, beam_size=3, prefix=prefixes, max_len_a=1.0, max_len_b=5)
    cached = beam_search(TinyModel(3, cached=True), SOURCES, beam_size=3, prefix=prefixes, max_len_a=1.0, max_len_b=5)
    for u, c in zip(uncached, cached):
        same(u, c)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_of_one_with_a_prefix_is_greedy(alpha: float) -> None:
    prefixes = [[6], [4, 4], [], [7, 5, 6]]
    model = TinyModel(seed=5)
    greedy = greedy_search(model, SOURCES, prefix=prefixes)
    beam = beam_search(model, SOURCES, beam_size=1, length_penalty=alpha, early_stop="fairseq", prefix=prefixes)
    for g, b in zip(greedy, beam):
        assert g[0].tokens == b[0].tokens
        assert g[0].log_prob == pytest.approx(b[0].log_prob, abs=1e-5)


def test_prefix_without_room_for_eos_is_refused() -> None:
    with pytest.raises(ValueError, match="sentence 1: its prefix of 3 tokens"):
        greedy_search(Scripted(AFTER_B), src_of(0, 0), max_len_a=0.0, max_len_b=3, prefix=[[], [A, A, A]])
    hyp = greedy_search(Scripted(AFTER_B), src_of(0), max_len_a=0.0, max_len_b=3, prefix=[[A, A]])[0][0]
    assert hyp.tokens == [A, A, EOS]  # a prefix one short of the limit still ends


# -------------------------------------------------------------------------- constraints


def test_progress_follows_overlapping_phrases() -> None:
    p = ConstraintState.start([[4, 5], [5, 6], []])
    assert (p.total, p.count, p.next_tokens()) == (4, 0, {4, 5})
    p = p.advance(4)
    assert (p.count, p.next_tokens()) == (1, {4, 5})
    p = p.advance(5)  # completes [4, 5] and begins [5, 6]
    assert (p.met, p.count, p.done) == ((True, False), 3, False)
    p = p.advance(7)  # breaks the partial [5, 6]
    assert (p.count, p.next_tokens()) == (2, {5})
    assert p.advance(5).advance(6).done
    twice = ConstraintState.start([[4], [4]]).advance(4)
    assert twice.met == (True, False)  # one token meets one phrase


def test_allocate_deals_the_beam_across_banks() -> None:
    scores = [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]
    banks = [0, 0, 0, 1, 2, 2]
    assert allocate(scores, banks, 3) == [4, 3, 0]  # the best of each bank, highest bank first
    assert allocate(scores, banks, 5) == [4, 3, 0, 5, 1]  # bank 1 is empty after one turn
    assert allocate(scores, [0] * 6, 4) == [0, 1, 2, 3]


# With beam 2 unconstrained search says "A EOS"; every output holding B scores lower.
B_COSTS = table_dist({(0,): {A: 0.9, B: 0.1}, (0, A): {EOS: 0.9, B: 0.1}, (0, B): {EOS: 1.0}, (0, A, B): {EOS: 1.0}})


@pytest.mark.parametrize("beam", [1, 2, 4])
def test_constraint_forces_a_lower_scoring_output(beam: int) -> None:
    plain = beam_search(Scripted(B_COSTS), src_of(0), beam_size=beam, length_penalty=0.0, **LIMITS)[0][0]
    assert plain.tokens == [A, EOS]
    hyp = beam_search(Scripted(B_COSTS), src_of(0), beam_size=beam, length_penalty=0.0, constraints=[[[B]]], **LIMITS)[
        0
    ][0]
    assert hyp.tokens == [B, EOS] and hyp.constraints_met
    assert hyp.log_prob == pytest.approx(math.log(0.1))


@pytest.mark.parametrize("phrases", [[[B, B]], [[A], [B]], [[A, A], [B]], [[B, A, B]]])
def test_constrained_beam_finds_the_best_output_holding_every_phrase(phrases: list[list[int]]) -> None:
    # 5 words over {A, B} at most: a beam of 32 holds every prefix, so the search is exhaustive
    # and must return the enumerated best among the outputs that contain every phrase.
    dist, alpha = random_dist(seed=7, eos_bias=0.3), 1.0
    results = beam_search(
        Scripted(dist), src_of(1, 2), beam_size=32, n_best=3, length_penalty=alpha, constraints=[phrases] * 2, **LIMITS
    )
    for key, hyps in zip((1, 2), results):
        allowed = [(t, lp) for t, lp in brute_force(dist, key, max_len=6) if all(contains(t, p) for p in phrases)]
        ranked = sorted(allowed, key=lambda x: x[1] / length_penalty(len(x[0]), alpha, "gnmt"), reverse=True)
        assert [h.tokens for h in hyps] == [t for t, _ in ranked[:3]]
        assert all(h.constraints_met for h in hyps)


def test_constraint_that_cannot_fit_returns_the_best_unmet_output() -> None:
    # Sentence 0 allows 2 tokens (one word and EOS): the phrase A B cannot fit, so EOS is
    # forced at the limit and the best such output comes back marked as unmet.
    dist = random_dist(seed=2)
    src = torch.tensor([[1, PAD], [2, 2]])
    results = beam_search(
        Scripted(dist), src, beam_size=4, max_len_a=1.0, max_len_b=1, constraints=[[[A, B]], [[A, B]]]
    )
    short, fits = results[0][0], results[1][0]
    assert not short.constraints_met and len(short.tokens) == 2 and short.tokens[-1] == EOS
    assert fits.constraints_met and fits.tokens[:2] == [A, B]


def test_no_constraints_is_plain_beam_search_exactly() -> None:
    model = TinyModel(seed=4, cached=True)
    kwargs = dict(beam_size=4, n_best=4, length_penalty=1.0)
    plain = beam_search(model, SOURCES, **kwargs)
    empty = beam_search(model, SOURCES, constraints=[[], [[]], [], []], **kwargs)
    mixed = beam_search(model, SOURCES, constraints=[[], [[6, 5]], [], [[7]]], **kwargs)
    for i, (p, e, m) in enumerate(zip(plain, empty, mixed)):
        assert [(h.tokens, h.score) for h in p] == [(h.tokens, h.score) for h in e]
        if i in (0, 2):  # sentences without constraints in a constrained batch
            assert [(h.tokens, h.score) for h in p] == [(h.tokens, h.score) for h in m]
    assert contains(mixed[1][0].tokens, [6, 5]) and contains(mixed[3][0].tokens, [7])


def test_constraints_with_prefix_and_cache_equal_uncached() -> None:
    kwargs = dict(beam_size=3, n_best=2, constraints=[[[5]], [[6, 6]], [], [[4], [7]]], prefix=[[7], [], [4], []])
    uncached = beam_search(TinyModel(6), SOURCES, **kwargs)
    cached = beam_search(TinyModel(6, cached=True), SOURCES, **kwargs)
    for u, c, phrases, prefix in zip(uncached, cached, kwargs["constraints"], kwargs["prefix"]):
        same(u, c)
        assert all(contains(h.tokens, p) for h in c for p in phrases)
        assert all(h.tokens[: len(prefix)] == prefix for h in c)


def dist_b_ends(key: tuple[int, ...]) -> dict[int, float]:
    """B once is cheap to finish after, yet every step the unmet A/UNK rows score higher."""
    generated = key[1:]
    if B in generated:
        return {EOS: 1.0}
    return {A: 0.45, UNK: 0.45, B: 0.1}


def test_a_hypothesis_that_met_its_constraints_finishes_in_its_bank() -> None:
    # The met "B EOS" (p .1) ranks below two unmet continuations at every step; it must still
    # finish at once, because ranking is by bank, not by score alone.
    hyp = beam_search(Scripted(dist_b_ends), src_of(0), beam_size=2, length_penalty=0.0, constraints=[[[B]]], **LIMITS)[
        0
    ][0]
    assert hyp.tokens == [B, EOS]
    assert hyp.log_prob == pytest.approx(math.log(0.1))
