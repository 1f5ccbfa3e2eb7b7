"""SentencePiece BPE, trained on the training split and carried inside every checkpoint.

Ids are fixed for every model: PAD=0, UNK=1, BOS=2, EOS=3 (``transformer.vocab``).
A source sentence is encoded as pieces + EOS; a target as BOS + pieces + EOS.
"""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path
from typing import Iterable, Optional, Sequence

import sentencepiece as spm

from transformer.vocab import BOS, EOS, PAD, UNK

log = logging.getLogger(__name__)


def train_sentencepiece(sentences: Iterable[str], vocab_size: int, max_sentences: int) -> bytes:
    """A BPE model proto trained on ``sentences``; the vocabulary may come out smaller
    than asked when the corpus is tiny (hard_vocab_limit off)."""
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=proto,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        num_threads=2,
        minloglevel=2,
    )
    return proto.getvalue()


class Tokenizer:
    """Source and target SentencePiece models (the same one when the vocabulary is joint)."""

    def __init__(self, src_proto: bytes, tgt_proto: Optional[bytes] = None):
        self.src_proto, self.tgt_proto = src_proto, tgt_proto if tgt_proto is not None else src_proto
        self.src = spm.SentencePieceProcessor(model_proto=self.src_proto)
        self.tgt = spm.SentencePieceProcessor(model_proto=self.tgt_proto) if tgt_proto is not None else self.src

    @property
    def joint(self) -> bool:
        return self.src_proto == self.tgt_proto

    @property
    def src_vocab_size(self) -> int:
        return self.src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt.get_piece_size()

    def encode_src(self, sentences: Sequence[str]) -> list[list[int]]:
        return [ids + [EOS] for ids in self.src.encode(list(sentences))]

    def encode_tgt(self, sentences: Sequence[str]) -> list[list[int]]:
        return [[BOS] + ids + [EOS] for ids in self.tgt.encode(list(sentences))]

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[list[int]], list[list[int]]]:
        """Source and target ids of ``pairs``."""
        return self.encode_src([s for s, _ in pairs]), self.encode_tgt([t for _, t in pairs])

    def decode_tgt(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Detokenized text; special ids are dropped."""
        return [self.tgt.decode([i for i in seq if i > EOS]) for seq in ids]

    def src_pieces(self, sentence: str) -> list[str]:
        return self.src.encode(sentence, out_type=str) + ["</s>"]

    def tgt_pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.tgt.id_to_piece(i) for i in ids]

    def to_state(self) -> dict:
        """Plain bytes for the checkpoint (safe under ``torch.load(weights_only=True)``)."""
        return {"src": self.src_proto, "tgt": None if self.joint else self.tgt_proto}

    @classmethod
    def from_state(cls, state: dict) -> "Tokenizer":
        return cls(state["src"], state["tgt"])

    def save(self, directory: Path) -> None:
        """Write ``spm.model`` (joint) or ``spm.src.model`` + ``spm.tgt.model``."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.joint:
            (directory / "spm.model").write_bytes(self.src_proto)
        else:
            (directory / "spm.src.model").write_bytes(self.src_proto)
            (directory / "spm.tgt.model").write_bytes(self.tgt_proto)

    @classmethod
    def load(cls, directory: Path) -> Optional["Tokenizer"]:
        """The tokenizer saved in ``directory``, or None when there is none."""
        if (directory / "spm.model").exists():
            return cls((directory / "spm.model").read_bytes())
        if (directory / "spm.src.model").exists():
            return cls((directory / "spm.src.model").read_bytes(), (directory / "spm.tgt.model").read_bytes())
        return None


BPE_SAMPLE_SEED = 0  # fixed: the same corpus always gives the same sample, the same BPE model, one cache


def sample_pairs(pairs: Iterable[tuple[str, str]], k: int, seed: int = BPE_SAMPLE_SEED) -> list[tuple[str, str]]:
    """A reproducible uniform sample of at most ``k`` pairs in corpus order, from one pass
    in O(k) memory (reservoir sampling, Algorithm R); a corpus of at most ``k`` pairs
    comes back whole, as it is."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, tuple[str, str]]] = []
    for i, pair in enumerate(pairs):
        if i < k:
            reservoir.append((i, pair))
        elif (j := rng.randrange(i + 1)) < k:
            reservoir[j] = (i, pair)
    return [pair for _, pair in sorted(reservoir, key=lambda item: item[0])]


def build_tokenizer(pairs: Iterable[tuple[str, str]], vocab_size: int, joint: bool, max_sentences: int) -> Tokenizer:
    """Train BPE on the training pairs, or on a reproducible sample of ``max_sentences``
    of them (data.tokenizer_sample): one model over both sides, or one per side."""
    pairs = sample_pairs(pairs, max_sentences)
    log.info("training SentencePiece BPE (vocab %d, %s) on %d pairs", vocab_size, "joint" if joint else "separate", len(pairs))
    if joint:
        return Tokenizer(train_sentencepiece((s for pair in pairs for s in pair), vocab_size, 2 * max_sentences))
    src = train_sentencepiece((s for s, _ in pairs), vocab_size, max_sentences)
    tgt = train_sentencepiece((t for _, t in pairs), vocab_size, max_sentences)
    return Tokenizer(src, tgt)
