"""SentencePiece BPE, trained on the training split and carried inside every checkpoint.

Ids are fixed for every model trained here: PAD=0, UNK=1, BOS=2, EOS=3 (``transformer.vocab``).
A source sentence is encoded as pieces + EOS; a target as BOS + pieces + EOS.
``MappedTokenizer`` carries an imported model's own vocabulary and special ids.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import sentencepiece as spm

from transformer.data.word_encoder import FlatIds, WordEncoder, flatten, with_specials
from transformer.errors import UserError, first_line
from transformer.rundir import atomic_write
from transformer.vocab import BOS, EOS, PAD, UNK

log = logging.getLogger(__name__)
TAG = re.compile(r"<2([^<>\s]+)>")  # a target-language tag, <2de> (data.tgt_lang_tag)


def language_tag(lang: str) -> str:
    return f"<2{lang}>"


def train_sentencepiece(
    sentences: Iterable[str], vocab_size: int, max_sentences: int, user_symbols: Sequence[str] = ()
) -> bytes:
    """A BPE model proto trained on ``sentences``; the vocabulary may come out smaller
    than asked when the corpus is tiny (hard_vocab_limit off). ``user_symbols`` (the
    language tags) are whole pieces, right after the four specials, never split."""
    proto = io.BytesIO()
    extra = {"user_defined_symbols": list(user_symbols)} if user_symbols else {}
    sentences = list(sentences)
    try:
        spm_train(proto, sentences, vocab_size, max_sentences, extra)
    except RuntimeError as e:
        raise bpe_error(e, vocab_size, sentences) from None
    return proto.getvalue()


MAX_BPE_SENTENCE = 4192  # bytes: SentencePiece skips longer training sentences (its max_sentence_length)


def bpe_error(error: RuntimeError, vocab_size: int, sentences: list[str]) -> UserError:
    """SentencePiece's refusal as one line naming what to change."""
    if found := re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(error)):
        return UserError(
            f"data.vocab_size={vocab_size} is too small: BPE needs at least {found[1]} pieces for this corpus "
            "(its distinct characters and the special pieces)"
        )
    if "sentences_.empty()" in str(error):
        longest = max((len(s.encode("utf-8")) for s in sentences), default=0)
        return UserError(
            f"no training sentence BPE can learn from: SentencePiece skips lines over {MAX_BPE_SENTENCE} bytes and the "
            f"longest of {len(sentences)} is {longest:,} bytes (is the corpus one sentence a line?)"
        )
    return UserError(f"SentencePiece BPE training failed: {first_line(error)}")


def spm_train(proto: io.BytesIO, sentences: list[str], vocab_size: int, max_sentences: int, extra: dict) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=proto,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        pad_id=PAD,
        unk_id=UNK,
        bos_id=BOS,
        eos_id=EOS,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        num_threads=2,
        minloglevel=2,
        max_sentence_length=MAX_BPE_SENTENCE,
        **extra,
    )


def tag_ids(sp: spm.SentencePieceProcessor) -> dict[str, int]:
    """language -> id of its tag piece: the run of ``<2xx>`` pieces that training puts right
    after the specials (a model trained without tags has none)."""
    tags, i = {}, EOS + 1
    while i < sp.get_piece_size() and (m := TAG.fullmatch(sp.id_to_piece(i))):
        tags[m.group(1)] = i
        i += 1
    return tags


class Tokenizer:
    """Source and target SentencePiece models (the same one when the vocabulary is joint)."""

    def __init__(self, src_proto: bytes, tgt_proto: bytes | None = None):
        self.src_proto, self.tgt_proto = src_proto, tgt_proto if tgt_proto is not None else src_proto
        self.src = spm.SentencePieceProcessor(model_proto=self.src_proto)
        self.tgt = spm.SentencePieceProcessor(model_proto=self.tgt_proto) if tgt_proto is not None else self.src
        self.tags = tag_ids(self.src)  # target-language tags of a multilingual model (README "Multilingual training")
        self.tgt_tags = set(tag_ids(self.tgt).values())  # dropped from decoded text

    @property
    def languages(self) -> list[str]:
        """The target languages the model's tags name (empty without data.tgt_lang_tag)."""
        return sorted(self.tags)

    @property
    def joint(self) -> bool:
        return self.src_proto == self.tgt_proto

    @property
    def src_vocab_size(self) -> int:
        return self.src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt.get_piece_size()

    @cached_property
    def src_start(self) -> int:
        """Ids put before a source sentence's pieces (an imported model's language code)."""
        return len(self.encode_src([""])[0]) - 1

    @cached_property
    def tgt_start(self) -> int:
        """Ids put between BOS and a target sentence's pieces (M2M100's target language)."""
        return len(self.encode_tgt([""])[0]) - 2

    def encode_src(self, sentences: Sequence[str]) -> list[list[int]]:
        return [ids + [EOS] for ids in self.src.encode(list(sentences))]

    def encode_tgt(self, sentences: Sequence[str]) -> list[list[int]]:
        return [[BOS] + ids + [EOS] for ids in self.tgt.encode(list(sentences))]

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[list[int]], list[list[int]]]:
        """Source and target ids of ``pairs``."""
        return self.encode_src([s for s, _ in pairs]), self.encode_tgt([t for _, t in pairs])

    @cached_property
    def word_encoders(self) -> tuple[WordEncoder, WordEncoder]:
        src = WordEncoder(self.src)
        return src, src if self.tgt is self.src else WordEncoder(self.tgt)

    def encode_pairs_flat(self, pairs: Sequence[tuple[str, str]]) -> tuple[FlatIds, FlatIds]:
        """``encode_pairs`` as (concatenated ids, lengths) per side, through the word cache:
        the bulk encoder of the training cache."""
        src_words, tgt_words = self.word_encoders
        return (
            with_specials(*src_words.encode([s for s, _ in pairs]), None, EOS),
            with_specials(*tgt_words.encode([t for _, t in pairs]), BOS, EOS),
        )

    def decode_tgt(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Detokenized text; special ids and language tags are dropped."""
        return [self.tgt.decode([i for i in seq if i > EOS and i not in self.tgt_tags]) for seq in ids]

    def src_pieces(self, sentence: str) -> list[str]:
        return self.src.encode(sentence, out_type=str) + ["</s>"]

    def tgt_pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.tgt.id_to_piece(i) for i in ids]

    def to_state(self) -> dict:
        """Plain bytes for the checkpoint (safe under ``torch.load(weights_only=True)``)."""
        return {"src": self.src_proto, "tgt": None if self.joint else self.tgt_proto}

    @classmethod
    def from_state(cls, state: dict) -> Tokenizer:
        if state.get("kind") == MappedTokenizer.KIND:
            return MappedTokenizer.from_state(state)
        return cls(state["src"], state["tgt"])

    def save(self, directory: Path) -> None:
        """Write ``spm.model`` (joint) or ``spm.src.model`` + ``spm.tgt.model``."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.joint:
            atomic_write(directory / "spm.model", self.src_proto)
        else:
            atomic_write(directory / "spm.src.model", self.src_proto)
            atomic_write(directory / "spm.tgt.model", self.tgt_proto)

    @classmethod
    def load(cls, directory: Path) -> Tokenizer | None:
        """The tokenizer saved in ``directory``, or None when there is none."""
        if (directory / MappedTokenizer.STATE_FILE).exists():
            return MappedTokenizer.load(directory)
        if (directory / "spm.model").exists():
            return cls((directory / "spm.model").read_bytes())
        if (directory / "spm.src.model").exists():
            return cls((directory / "spm.src.model").read_bytes(), (directory / "spm.tgt.model").read_bytes())
        return None


class MappedTokenizer(Tokenizer):
    """SentencePiece pieces looked up in a vocabulary of their own, as Hugging Face's Marian
    (OPUS-MT) and M2M100 tokenizers do: an id is a piece's position in ``src_vocab`` /
    ``tgt_vocab`` (one list when shared), not its SentencePiece id, and a piece missing from
    the list is ``unk``. A ``>>xx<<`` tag opening a line (OPUS-MT's target language) is one
    token. Sources are src_prefix + pieces + EOS, targets BOS + tgt_prefix + pieces + EOS
    (M2M100: the language tokens); ``special`` ids are dropped when detokenizing."""

    KIND = "mapped"
    STATE_FILE = "tokenizer_state.json"  # save(): everything but the SentencePiece models

    def __init__(
        self,
        src_proto: bytes,
        tgt_proto: bytes,
        src_vocab: Sequence[str],
        tgt_vocab: Sequence[str] | None,
        *,
        unk: int,
        eos: int,
        bos: int,
        pad: int,
        special: Sequence[int],
        src_prefix: Sequence[int] = (),
        tgt_prefix: Sequence[int] = (),
    ):
        super().__init__(src_proto, tgt_proto)
        self.tags, self.tgt_tags = {}, set()  # ids here are vocabulary positions: no <2xx> tags
        self.src_vocab, self.tgt_vocab = list(src_vocab), None if tgt_vocab is None else list(tgt_vocab)
        self.ids = dict(unk=unk, eos=eos, bos=bos, pad=pad)
        self.special, self.src_prefix, self.tgt_prefix = sorted(set(special)), list(src_prefix), list(tgt_prefix)
        self.src_index = _first_ids(self.src_vocab)
        self.tgt_index = self.src_index if self.tgt_vocab is None else _first_ids(self.tgt_vocab)

    @property
    def joint(self) -> bool:
        return self.tgt_vocab is None

    @property
    def src_vocab_size(self) -> int:
        return len(self.src_vocab)

    @property
    def tgt_vocab_size(self) -> int:
        return len(self.src_vocab if self.tgt_vocab is None else self.tgt_vocab)

    def _pieces(self, sentence: str, sp: spm.SentencePieceProcessor) -> list[str]:
        code = []
        if sentence.startswith(">>") and (end := sentence.find("<<")) != -1:
            code, sentence = [sentence[: end + 2]], sentence[end + 2 :]
        return code + sp.encode(sentence, out_type=str)

    def _ids(self, pieces: list[str], index: dict[str, int]) -> list[int]:
        return [index.get(p, self.ids["unk"]) for p in pieces]

    def encode_src(self, sentences: Sequence[str]) -> list[list[int]]:
        return [
            self.src_prefix + self._ids(self._pieces(s, self.src), self.src_index) + [self.ids["eos"]]
            for s in sentences
        ]

    def encode_tgt(self, sentences: Sequence[str]) -> list[list[int]]:
        start = [self.ids["bos"]] + self.tgt_prefix
        return [start + self._ids(self._pieces(s, self.tgt), self.tgt_index) + [self.ids["eos"]] for s in sentences]

    def encode_pairs_flat(self, pairs: Sequence[tuple[str, str]]) -> tuple[FlatIds, FlatIds]:
        src, tgt = self.encode_pairs(pairs)
        return flatten(src), flatten(tgt)

    def decode_tgt(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Detokenized text; special ids are dropped."""
        special = set(self.special)
        return [
            self.tgt.decode_pieces(self.tgt_pieces([i for i in seq if i not in special])).replace("\u2581", " ").strip()
            for seq in ids
        ]

    def src_pieces(self, sentence: str) -> list[str]:
        return (
            [self.src_vocab[i] for i in self.src_prefix]
            + self._pieces(sentence, self.src)
            + [self.src_vocab[self.ids["eos"]]]
        )

    def tgt_pieces(self, ids: Sequence[int]) -> list[str]:
        vocab = self.src_vocab if self.tgt_vocab is None else self.tgt_vocab
        return [vocab[i] for i in ids]

    def to_state(self) -> dict:
        return {"kind": self.KIND, "src": self.src_proto, "tgt": self.tgt_proto} | self._plain_state()

    def _plain_state(self) -> dict:
        return {
            "src_vocab": self.src_vocab,
            "tgt_vocab": self.tgt_vocab,
            "ids": dict(self.ids),
            "special": self.special,
            "src_prefix": self.src_prefix,
            "tgt_prefix": self.tgt_prefix,
        }

    @classmethod
    def from_state(cls, state: dict) -> MappedTokenizer:
        return cls(
            state["src"],
            state["tgt"],
            state["src_vocab"],
            state["tgt_vocab"],
            **state["ids"],
            special=state["special"],
            src_prefix=state["src_prefix"],
            tgt_prefix=state["tgt_prefix"],
        )

    def save(self, directory: Path) -> None:
        """Write ``source.spm``, ``target.spm`` and ``tokenizer_state.json`` (vocabularies, ids)."""
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / "source.spm", self.src_proto)
        atomic_write(directory / "target.spm", self.tgt_proto)
        atomic_write(directory / self.STATE_FILE, json.dumps(self._plain_state(), ensure_ascii=False))

    @classmethod
    def load(cls, directory: Path) -> MappedTokenizer:
        state = json.loads((directory / cls.STATE_FILE).read_text(encoding="utf-8"))
        state |= {
            "kind": cls.KIND,
            "src": (directory / "source.spm").read_bytes(),
            "tgt": (directory / "target.spm").read_bytes(),
        }
        return cls.from_state(state)


def _first_ids(vocab: Sequence[str]) -> dict[str, int]:
    """piece -> id, the first id where a piece occurs more than once."""
    index: dict[str, int] = {}
    for i, piece in enumerate(vocab):
        index.setdefault(piece, i)
    return index


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


def build_tokenizer(
    pairs: Iterable[tuple[str, str]],
    vocab_size: int,
    joint: bool,
    max_sentences: int,
    languages: Sequence[str] = (),
    symbols: Sequence[str] = (),
) -> Tokenizer:
    """Train BPE on the training pairs, or on a reproducible sample of ``max_sentences``
    of them (data.tokenizer_sample): one model over both sides, or one per side. Each of
    ``languages`` gets its tag piece in the (source) model, and so does each of ``symbols``
    (the back-translation tag), after them."""
    tags = [language_tag(lang) for lang in languages] + list(symbols)
    pairs = sample_pairs(pairs, max_sentences)
    log.info(
        "training SentencePiece BPE (vocab %d, %s) on %d pairs",
        vocab_size,
        "joint" if joint else "separate",
        len(pairs),
    )
    if joint:
        return Tokenizer(train_sentencepiece((s for pair in pairs for s in pair), vocab_size, 2 * max_sentences, tags))
    src = train_sentencepiece((s for s, _ in pairs), vocab_size, max_sentences, tags)
    tgt = train_sentencepiece((t for _, t in pairs), vocab_size, max_sentences)
    return Tokenizer(src, tgt)
