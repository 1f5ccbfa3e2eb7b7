"""Word alignments from search's subword links, written the Pharaoh way (``i-j``: source word
i is aligned to target word j, both counted from 0).

Search gives every target subword the source subword its step attended most (see
`search`); users want words, so subwords are grouped into words by SentencePiece's word
marker: a piece starting with "▁" (U+2581) begins a new word. Language tags and EOS belong
to no word, and links to or from them are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

WORD_START = "\u2581"


def word_indices(pieces: Sequence[str], start: int, end: int) -> list[int | None]:
    """Word index of each piece; None outside pieces[start:end] (tags, EOS). The first piece
    of the range begins a word even without the marker."""
    out: list[int | None] = []
    word = -1
    for k, piece in enumerate(pieces):
        if not start <= k < end:
            out.append(None)
            continue
        if k == start or piece.startswith(WORD_START):
            word += 1
        out.append(word)
    return out


def word_pairs(
    links: Sequence[int], source_words: Sequence[int | None], target_words: Sequence[int | None]
) -> list[tuple[int, int]]:
    """(source word, target word) pairs, each once, sorted, from ``links``: for target piece t,
    the source piece it attends most."""
    pairs = set()
    for t, s in enumerate(links):
        tgt = target_words[t] if t < len(target_words) else None
        src = source_words[s] if s < len(source_words) else None
        if tgt is not None and src is not None:
            pairs.add((src, tgt))
    return sorted(pairs)


def pharaoh(pairs: Sequence[tuple[int, int]]) -> str:
    """``"0-0 1-2 ..."``."""
    return " ".join(f"{i}-{j}" for i, j in pairs)
