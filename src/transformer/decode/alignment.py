"""Word alignments from search's subword links, written the Pharaoh way (``i-j``: source word
i is aligned to target word j, both counted from 0).

Search gives every target subword the source subword its step attended most (see
`search`); users want words, so subwords are grouped into words by SentencePiece's word
marker: a piece starting with "▁" (U+2581) begins a new word. Language tags and EOS belong
to no word, and links to or from them are dropped. ``forced_attention`` gives the
cross-attention matrix behind a given output (``Translator.hypotheses(attention=True)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from transformer.data.tokenizer import Tokenizer
from transformer.errors import UserError
from transformer.model import Transformer

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


def source_words(tokenizer: Tokenizer, sentence: str, ids: list[int]) -> list[int | None]:
    """Word index of each of the source ``ids`` of ``sentence`` (language tags, also ones
    put before the tokenizer's ids, and EOS: None)."""
    pieces = tokenizer.src_pieces(sentence)
    tags: list[int | None] = [None] * (len(ids) - len(pieces))
    return tags + word_indices(pieces, tokenizer.src_start, len(pieces) - 1)


def target_words(tokenizer: Tokenizer, tokens: list[int], eos: int) -> list[int | None]:
    """Word index of each generated subword ``tokens`` (language tag and EOS: None)."""
    end = len(tokens) - (1 if tokens and tokens[-1] == eos else 0)
    return word_indices(tokenizer.tgt_pieces(tokens), tokenizer.tgt_start, end)


def pharaoh(pairs: Sequence[tuple[int, int]]) -> str:
    """``"0-0 1-2 ..."``."""
    return " ".join(f"{i}-{j}" for i, j in pairs)


@torch.inference_mode()
def forced_attention(
    model: Transformer, src_ids: list[int], tgt_ids: list[int], layer: int = -1, head: int = -1
) -> Tensor:
    """Cross-attention (T, S) of ``model`` for a forced target (row t: the step that
    produced tgt_ids[t]) in decoder ``layer`` and ``head`` (-1: the mean over all);
    every row sums to one."""
    for name, index, count, what in (
        ("attention_layer", layer, model.cfg.n_decoder_layers, "decoder layers"),
        ("attention_head", head, model.cfg.n_heads, "heads"),
    ):
        if not -1 <= index < count:
            raise UserError(f"{name}={index}: the model has {count} {what}; use 0..{count - 1}, or -1 for the mean")
    device = next(model.parameters()).device
    src = torch.tensor([src_ids[: model.cfg.max_positions]], device=device)
    tgt = torch.tensor([[model.cfg.bos_id] + list(tgt_ids[:-1])], device=device)  # row t predicts tgt_ids[t]
    weights = model.cross_attention(src, tgt)[:, 0]  # (L, H, T, S)
    weights = weights.mean(dim=0) if layer == -1 else weights[layer]  # (H, T, S)
    weights = weights.mean(dim=0) if head == -1 else weights[head]  # (T, S)
    return weights.float().cpu()
