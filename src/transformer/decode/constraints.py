"""Lexical constraints for beam search: phrases every output must contain (terminology).

The algorithm is dynamic beam allocation (Post & Vilar 2018, as in fairseq's
``--constraints unordered``): each hypothesis tracks how many constraint tokens it has
produced, candidates are grouped into banks by that count, and the beam is dealt out across
the banks so that hypotheses that have met more of the constraints are not crowded out by
better-scoring ones that have met fewer. Phrases may be met in any order.

This module knows tokens only; `search.beam_search` applies it to tensors.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ConstraintState:
    """Where one hypothesis stands with its sentence's phrases (immutable: beams share them).

    ``partial`` holds (phrase, tokens matched) for every phrase begun but not finished, so
    phrases sharing a start or overlapping are all followed; a token that does not continue
    a partial match drops it (the phrase must appear contiguously).
    """

    phrases: tuple[tuple[int, ...], ...]
    met: tuple[bool, ...]
    partial: frozenset[tuple[int, int]] = frozenset()

    @classmethod
    def start(cls, phrases: Sequence[Sequence[int]]) -> ConstraintState:
        kept = tuple(tuple(p) for p in phrases if len(p) > 0)
        return cls(kept, (False,) * len(kept))

    @property
    def done(self) -> bool:
        """All phrases met: EOS may end this hypothesis."""
        return all(self.met)

    @property
    def count(self) -> int:
        """Constraint tokens produced so far (the bank): met phrases and the longest partial match."""
        whole = sum(len(p) for p, m in zip(self.phrases, self.met) if m)
        return whole + max((n for _, n in self.partial), default=0)

    @property
    def total(self) -> int:
        """Constraint tokens in all: the highest bank."""
        return sum(len(p) for p in self.phrases)

    def next_tokens(self) -> set[int]:
        """Tokens that make progress: the next token of each partial match and the first of each unmet phrase."""
        tokens = {self.phrases[p][n] for p, n in self.partial}
        return tokens | {p[0] for p, m in zip(self.phrases, self.met) if not m}

    def advance(self, token: int) -> ConstraintState:
        """The progress after appending `token`; one token completes at most one phrase."""
        if not self.phrases:
            return self
        met, partial, completed = list(self.met), set(), False
        for p, n in sorted(self.partial | {(p, 0) for p, m in enumerate(self.met) if not m}):
            if met[p] or self.phrases[p][n] != token:
                continue
            if n + 1 < len(self.phrases[p]):
                partial.add((p, n + 1))
            elif not completed:
                met[p], completed = True, True
        return ConstraintState(self.phrases, tuple(met), frozenset((p, n) for p, n in partial if not met[p]))


def allocate(scores: Sequence[float], banks: Sequence[int], k: int) -> list[int]:
    """Indices of the `k` candidates to keep, by dynamic beam allocation.

    Candidates are grouped by bank (constraint tokens met); the beam is dealt out in turns,
    the highest bank first, each bank taking its best remaining candidate. Every bank so
    keeps about k / (banks + 1) places, and places a bank cannot fill go to the others.
    """
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    taken: Counter[int] = Counter()
    turn = {}
    for i in order:
        turn[i] = taken[banks[i]]
        taken[banks[i]] += 1
    return sorted(order, key=lambda i: (turn[i], -banks[i]))[:k]
