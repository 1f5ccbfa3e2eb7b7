"""The Python API: ``Translator`` turns text into translations with one checkpoint (or an
ensemble), for decode, evaluate, the server and users' code. The work behind it lives apart:
`batching` (ids to hypotheses), `prepare` (packed and int8 models), `guides` (prefixes and
constraints), `alignment` (subword links to word pairs), `search` (the searches)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from transformer.checkpoint import load_model, model_from_checkpoint
from transformer.config import DecodeConfig
from transformer.data.multilingual import tag_prefix
from transformer.data.tokenizer import Tokenizer
from transformer.decode.alignment import forced_attention, source_words, target_words, word_pairs
from transformer.decode.batching import translate_ids
from transformer.decode.fast import resolve_shortlist
from transformer.decode.guides import line_guides, prefix_ids, target_ids
from transformer.decode.prepare import packs_weights, prepare_models, resolve_decode
from transformer.decode.rules import Hypothesis
from transformer.decode.shortlist import Shortlist
from transformer.errors import UserError
from transformer.model import Transformer
from transformer.runtime import resolve_device


@dataclass
class Translation:
    """One hypothesis: detokenized text, its score, subword pieces and, on request,
    cross-attention (target pieces x source pieces; by default the mean over layers and heads)."""

    text: str
    score: float
    log_prob: float
    tokens: list[str]
    attention: Tensor | None = None
    alignment: list[tuple[int, int]] | None = None  # decode.alignment: (source word, target word) pairs


@dataclass(frozen=True)
class Request:
    """What a ``Translator.hypotheses`` call asks for beside the decode settings (see there)."""

    attention: bool = False
    attention_layer: int = -1
    attention_head: int = -1
    first_line: int = 1
    prefix: str | Sequence[str] | None = None
    constraints: Sequence[Sequence[str]] | None = None


class Translator:
    """Translate text with one checkpoint (or an ensemble of checkpoints sharing a vocabulary).

    >>> t = Translator.from_checkpoint("outputs/run")      # a run directory or a .pt file
    >>> t.translate(["twenty-one apples"], beam_size=5)
    """

    def __init__(
        self,
        models: Sequence[Transformer],
        tokenizer: Tokenizer,
        config: DecodeConfig | None = None,
        checkpoint: str | Path | None = None,
    ):
        self.models = [m.eval() for m in models]
        self.tokenizer = tokenizer
        self.config = config or DecodeConfig()
        self.checkpoint = checkpoint  # where decode.shortlist=auto looks for shortlist.pt
        self.packed: tuple[tuple[str, str], list[Transformer]] | None = None  # ((prepack, quantize), copies)

    def search_models(self, cfg: DecodeConfig) -> list[Transformer]:
        """The models to search with under ``cfg``: the packed or int8 copies, built once (so a
        stream of small chunks does not repack for each)."""
        device = next(self.models[0].parameters()).device
        cfg = resolve_decode(cfg, device, self.models[0])
        if not packs_weights(cfg, device) and cfg.quantize != "int8":
            return self.models
        if self.packed is None or self.packed[0] != (cfg.prepack, cfg.quantize):
            self.packed = ((cfg.prepack, cfg.quantize), prepare_models(self.models, cfg, device))
        return self.packed[1]

    def shortlist(self, cfg: DecodeConfig) -> Shortlist | None:
        """The vocabulary shortlist ``cfg`` asks for (auto: the one beside this translator's checkpoint)."""
        return resolve_shortlist(cfg, self.checkpoint, self.models[0].cfg.tgt_vocab_size)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str = "auto",
        ensemble: Iterable[str | Path] = (),
        config: DecodeConfig | None = None,
    ) -> Translator:
        dev = resolve_device(device)
        model, tokenizer, _ = load_model(path)
        models = [model] + [load_model(extra, tokenizer)[0] for extra in ensemble]
        return cls([m.to(dev) for m in models], tokenizer, config, checkpoint=path)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str = "auto",
        config: DecodeConfig | None = None,
        **languages: str | None,
    ) -> Translator:
        """A Hugging Face Marian/M2M100 model directory, imported in memory (``transformer-import``
        writes the same as a checkpoint); M2M100 needs ``src_lang=`` and ``tgt_lang=``."""
        from transformer.import_hf import import_directory

        model, tokenizer = model_from_checkpoint(import_directory(directory, **languages))
        return cls([model.to(resolve_device(device))], tokenizer, config)

    def options(self, **overrides: Any) -> DecodeConfig:
        """This translator's decode settings with ``overrides`` (names of DecodeConfig)."""
        known = {f.name for f in fields(DecodeConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UserError(f"unknown decode option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return replace(self.config, **overrides)

    def hypotheses(
        self,
        sentences: Sequence[str],
        attention: bool = False,
        attention_layer: int = -1,
        attention_head: int = -1,
        first_line: int = 1,
        prefix: str | Sequence[str] | None = None,
        constraints: Sequence[Sequence[str]] | None = None,
        **overrides: Any,
    ) -> list[list[Translation]]:
        """n-best Translations per sentence, best first; with ``attention``, each carries its
        cross-attention of decoder ``attention_layer`` and ``attention_head`` (-1: the mean).

        ``prefix``: target text every output starts with, one for all sentences or one per
        sentence ("" for none; default decode.prefix). ``constraints``: per sentence, target
        phrases every output must contain (beam search). A blank sentence stays empty: n_best
        empty hypotheses (score 0), whatever the search made of it (it keeps its line number).
        Other engines (``serve.ct2_engine``) keep this signature and override ``translations``."""
        request = Request(attention, attention_layer, attention_head, first_line, prefix, constraints)
        return self.translations(sentences, self.options(**overrides), request)

    def translations(self, sentences: Sequence[str], cfg: DecodeConfig, request: Request) -> list[list[Translation]]:
        """``hypotheses`` under the settled ``cfg``: what an engine implements."""
        tag = tag_prefix(self.tokenizer, cfg.tgt_lang)  # a multilingual model's <2xx> for decode.tgt_lang
        src_ids = [tag + ids for ids in self.tokenizer.encode_src(sentences)]
        prefixes = prefix_ids(self.tokenizer, cfg, request.prefix, len(src_ids))
        phrases = None
        if request.constraints is not None:
            phrases = [target_ids(self.tokenizer, c, keep_start=False) for c in request.constraints]
        results = translate_ids(
            self.search_models(cfg),
            src_ids,
            cfg,
            first_line=request.first_line,
            prefixes=prefixes,
            constraints=phrases,
            shortlist=self.shortlist(cfg),
        )
        out = [
            self.translated(sentence, ids, hyps, cfg, request)
            for sentence, ids, hyps in zip(sentences, src_ids, results)
        ]
        empty = Translation(
            "", 0.0, 0.0, [], torch.zeros(0, 0) if request.attention else None, [] if cfg.alignment else None
        )
        return [[empty] * cfg.n_best if not sentence.strip() else hyps for sentence, hyps in zip(sentences, out)]

    def translated(
        self, sentence: str, ids: list[int], hyps: list[Hypothesis], cfg: DecodeConfig, request: Request
    ) -> list[Translation]:
        """One sentence's hypotheses as Translations: text, pieces, and what ``request`` and ``cfg`` ask for."""
        texts = self.tokenizer.decode_tgt([h.tokens for h in hyps])
        sources = source_words(self.tokenizer, sentence, ids) if cfg.alignment else []
        eos = self.models[0].specials.eos
        return [
            Translation(
                text,
                h.score,
                h.log_prob,
                self.tokenizer.tgt_pieces(h.tokens),
                self.attention(ids, h.tokens, request.attention_layer, request.attention_head)
                if request.attention
                else None,
                None
                if h.alignment is None
                else word_pairs(h.alignment, sources, target_words(self.tokenizer, h.tokens, eos)),
            )
            for text, h in zip(texts, hyps)
        ]

    def translate(self, sentences: Sequence[str] | str, **overrides: Any) -> list[str] | str:
        """Best translation of each sentence (a string for a string)."""
        single = isinstance(sentences, str)
        best = [hyps[0].text for hyps in self.hypotheses([sentences] if single else sentences, **overrides)]
        return best[0] if single else best

    def translate_stream(self, lines: Iterable[str], chunk: int = 64, **overrides: Any) -> Iterator[list[Translation]]:
        """n-best lists for an endless stream of lines, in order, ``chunk`` lines at a time;
        each line's prefix and constraints come from decode.prefix_file and decode.constraints_file."""
        guides = line_guides(self.options(**overrides))
        buffer: list[tuple[str, str | None, list[str]]] = []
        done = 0  # lines translated so far, so warnings name the line of the whole stream
        for line in lines:
            buffer.append((line.rstrip("\r\n"), *next(guides)))
            if len(buffer) == chunk:
                yield from self.guided_chunk(buffer, done + 1, overrides)
                done += len(buffer)
                buffer = []
        if buffer:
            yield from self.guided_chunk(buffer, done + 1, overrides)

    def guided_chunk(
        self, buffer: list[tuple[str, str | None, list[str]]], first_line: int, overrides: dict
    ) -> list[list[Translation]]:
        """``hypotheses`` of (sentence, prefix, phrases) triples (prefix None: decode.prefix)."""
        sentences, prefixes, phrases = zip(*buffer)
        return self.hypotheses(
            list(sentences),
            first_line=first_line,
            prefix=None if prefixes[0] is None else list(prefixes),
            constraints=list(phrases) if any(phrases) else None,
            **overrides,
        )

    def attention(self, src_ids: list[int], tgt_ids: list[int], layer: int = -1, head: int = -1) -> Tensor:
        """Cross-attention (T, S) of the first model for a forced target (``alignment.forced_attention``)."""
        return forced_attention(self.models[0], src_ids, tgt_ids, layer, head)
