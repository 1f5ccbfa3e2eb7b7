"""The word-cached bulk encoder gives SentencePiece's own ids: on a corpus, on whitespace and
normalisation corner cases, across a cache reset, and it falls back (with a warning) for a
model that does not split by word or when its check disagrees."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import sentencepiece as spm

from transformer.data.builtin import builtin_splits
from transformer.data.tokenizer import MappedTokenizer, build_tokenizer
from transformer.data.word_encoder import WordEncoder, flatten, splits_by_word, with_specials
from transformer.vocab import BOS, EOS

PAIRS = builtin_splits(600, 0, 0, seed=3)["train"]
ODD = [
    "",
    " ",
    "  two  spaces  ",
    "\ttab\tinside",
    "no\u00a0break",
    "wide \u3000 space",
    "bell \x07 char",
    "\u00a8 \u00a8a a\u00a8",
    "\ufb01ne \u216b \u338f",
    "a \u0301b",
    " \u200b ",
    "line\r\nbreak",
    "<2de> x<2de>y",
    "Größe Maß über",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(PAIRS, 300, joint=True, max_sentences=10_000, languages=["de"])


def pieces_of(flat: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    return [part.tolist() for part in np.split(flat, np.cumsum(lengths)[:-1])] if len(lengths) else []


def test_cached_encoding_is_sentencepiece_exactly(tokenizer) -> None:
    sentences = [s for pair in PAIRS for s in pair] + ODD
    encoder = WordEncoder(tokenizer.src)
    assert encoder.cached
    for _ in range(2):  # cold, then every word from the cache
        flat, lengths = encoder.encode(sentences)
        assert encoder.cached, "the sample check disagreed"
        assert pieces_of(flat, lengths) == tokenizer.src.encode(sentences)


def test_the_cache_starts_again_past_its_bound(tokenizer) -> None:
    encoder = WordEncoder(tokenizer.src, max_words=20)
    sentences = [s for s, _ in PAIRS[:50]]
    encoder.encode(sentences)
    assert len(encoder.pieces) > 20
    flat, lengths = encoder.encode(sentences[::-1])
    assert pieces_of(flat, lengths) == tokenizer.src.encode(sentences[::-1])
    assert len(encoder.pieces) <= len(set(" ".join(sentences).split(" ")))


def test_a_disagreeing_cache_falls_back_with_a_warning(tokenizer, caplog) -> None:
    encoder = WordEncoder(tokenizer.src)
    sentences = [s for s, _ in PAIRS[:20]]
    encoder.encode(sentences)
    for word in encoder.pieces:  # corrupt every cached word
        encoder.pieces[word] = b"\x07\x00\x00\x00"

    with caplog.at_level(logging.WARNING):
        flat, lengths = encoder.encode(sentences)
    assert pieces_of(flat, lengths) == tokenizer.src.encode(sentences)
    assert not encoder.cached and "disagrees with SentencePiece" in caplog.text


def test_a_model_that_merges_across_words_is_never_cached() -> None:
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([s for pair in PAIRS for s in pair]),
        model_writer=proto,
        model_type="bpe",
        vocab_size=300,
        split_by_whitespace=False,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    assert not splits_by_word(sp)
    encoder = WordEncoder(sp)
    sentences = [s for s, _ in PAIRS[:30]]
    assert pieces_of(*encoder.encode(sentences)) == sp.encode(sentences)
    assert len(encoder.pieces) == 0


def test_specials_handle_empty_sequences() -> None:
    flat, lengths = flatten([[5, 6], [], [7]])
    assert pieces_of(*with_specials(flat, lengths, BOS, EOS)) == [[BOS, 5, 6, EOS], [BOS, EOS], [BOS, 7, EOS]]
    assert pieces_of(*with_specials(flat, lengths, None, EOS)) == [[5, 6, EOS], [EOS], [7, EOS]]


def test_flat_pairs_equal_the_list_encoding(tokenizer) -> None:
    vocab = [tokenizer.src.id_to_piece(i) for i in range(tokenizer.src_vocab_size)]
    mapped = MappedTokenizer(
        tokenizer.src_proto, tokenizer.src_proto, vocab, None, unk=1, eos=3, bos=2, pad=0, special=[0, 2, 3]
    )
    pairs = PAIRS[:40] + [(odd, odd) for odd in ODD]
    for tok in (tokenizer, mapped):
        (src, src_lengths), (tgt, tgt_lengths) = tok.encode_pairs_flat(pairs)
        expect_src, expect_tgt = tok.encode_pairs(pairs)
        assert pieces_of(src, src_lengths) == expect_src
        assert pieces_of(tgt, tgt_lengths) == expect_tgt
