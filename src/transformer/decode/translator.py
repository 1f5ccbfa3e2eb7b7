"""From text to translations: the Python API and the code behind decode, evaluate and
validation BLEU.

``ModelScorer`` adapts a ``Transformer`` to the search protocol (cached incremental
decoding by default; ``cached=False`` reruns the full prefix and is the reference in tests).
``translate_ids`` batches sentences by length, searches, and restores input order.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer.checkpoint import load_model, model_from_checkpoint
from transformer.config import DecodeConfig, setting, validate_section
from transformer.data.batching import pad, token_batches
from transformer.data.corpus import open_text
from transformer.data.multilingual import tag_prefix
from transformer.data.tokenizer import Tokenizer
from transformer.decode.alignment import word_indices, word_pairs
from transformer.decode.fast import log_choice, output_rows, required_tokens, resolve_quantize, resolve_shortlist
from transformer.decode.search import (
    NEG_INF,
    Ensemble,
    Hypothesis,
    Scorer,
    beam_search,
    greedy_search,
    max_lengths,
    sample,
)
from transformer.decode.shortlist import Shortlist
from transformer.errors import UserError
from transformer.hardware import resolve_precision
from transformer.model import Transformer
from transformer.model.cache import DecoderCache
from transformer.model.kernels import onednn_shapes
from transformer.model.prepack import packed_for_cpu
from transformer.model.quantize import quantized_for_cpu
from transformer.runtime import autocast, resolve_device
from transformer.vocab import EOS, Specials

log = logging.getLogger(__name__)


class ModelScorer:
    """One model as a search scorer; with ``align_layer``, cached steps also keep that decoder
    layer's cross-attention for alignments (negative counts from the end, clamped to the first).
    With ``vocab`` (K,) sorted target ids (a shortlist's candidates), the output projection and
    the softmax run over those rows only, every other token gets -inf."""

    def __init__(
        self, model: Transformer, cached: bool = True, align_layer: int | None = None, vocab: Tensor | None = None
    ):
        self.model, self.cached, self.vocab = model, cached, vocab
        self.align_layer = align_layer if align_layer is None else max(align_layer, -model.cfg.n_decoder_layers)
        self.project = model.output if vocab is None else output_rows(model.output, vocab)

    def start(self, src: Tensor) -> DecoderCache | dict:
        memory, mask = self.model.encode(src)
        if self.cached:
            return self.model.start_cache(memory, mask, self.align_layer)
        return {"memory": memory, "mask": mask}

    def select(self, state: DecoderCache | dict, index: Tensor) -> DecoderCache | dict:
        if self.cached:
            return self.model.select_cache(state, index)
        return {"memory": state["memory"].index_select(0, index), "mask": state["mask"].index_select(0, index)}

    def step(self, state: DecoderCache | dict, prefix: Tensor) -> tuple[Tensor, DecoderCache | dict]:
        if self.cached:
            hidden = self.model.decode_step(prefix[:, -1:], state)  # (N, D)
        else:
            hidden = self.model.decode(prefix, state["memory"], state["mask"])[:, -1]
        log_probs = F.log_softmax(self.project(hidden).float(), dim=-1)
        if self.vocab is None:
            return log_probs, state
        full = log_probs.new_full((log_probs.size(0), self.model.cfg.tgt_vocab_size), NEG_INF)
        return full.index_copy_(1, self.vocab, log_probs), state

    def attention(self, state: DecoderCache | dict) -> Tensor:
        if not isinstance(state, DecoderCache) or state.alignment is None:
            raise ValueError("alignments need a cached ModelScorer made with align_layer")
        return state.alignment


def make_scorer(
    models: Sequence[Transformer], cached: bool = True, align_layer: int | None = None, vocab: Tensor | None = None
) -> Scorer:
    scorers = [ModelScorer(m, cached, align_layer, vocab) for m in models]
    return scorers[0] if len(scorers) == 1 else Ensemble(scorers)


def check_decode_config(cfg: DecodeConfig) -> None:
    """Name the decode key that is wrong before any search starts."""
    validate_section("decode", cfg)
    for key in ("beam_size", "n_best"):
        if getattr(cfg, key) < 1:
            raise UserError(f"decode.{key}={getattr(cfg, key)} must be >= 1")
    if cfg.sampling and cfg.temperature <= 0:
        raise UserError(f"decode.temperature={cfg.temperature} must be > 0 when sampling")


def resolve_decode(cfg: DecodeConfig, device: torch.device, model: Transformer | None = None) -> DecodeConfig:
    """``cfg`` with ``auto`` settled for this device: precision (bf16 where native), quantize
    (``fast.resolve_quantize``, timed on ``model``; int8 computes the rest in fp32) and prepack
    (``true``/``false``, or ``auto`` kept for a per-shape timing in ``pack_models``)."""
    int8 = setting(cfg.quantize, "decode.quantize") == "int8" and cfg.precision == "auto"
    precision = "fp32" if int8 else resolve_precision(cfg.precision, device, "decode.precision")
    cfg = replace(cfg, precision=precision, prepack=setting(cfg.prepack, "decode.prepack"))
    quantize = resolve_quantize(cfg, device, model) if model is not None or cfg.quantize != "auto" else "none"
    return replace(cfg, quantize=quantize, precision="fp32" if quantize == "int8" else precision)


def search(
    scorer: Scorer,
    src: Tensor,
    cfg: DecodeConfig,
    max_positions: int,
    specials: Specials = Specials(),
    prefix: Sequence[list[int]] | None = None,
    constraints: Sequence[list[list[int]]] | None = None,
) -> list[list[Hypothesis]]:
    """Run the search ``cfg`` asks for on one padded batch; constraints need beam search (a
    beam of 1 with constraints is a beam search, not greedy)."""
    lengths = dict(
        max_len_a=cfg.max_len_a,
        max_len_b=cfg.max_len_b,
        max_len_limit=max_positions - 1,
        min_len=cfg.min_len,
        specials=specials,
        prefix=prefix,
        alignment=cfg.alignment,
    )
    if cfg.sampling:
        return sample(
            scorer, src, n=cfg.n_best, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, **lengths
        )
    if cfg.beam_size <= 1 and not any(constraints or []):
        return greedy_search(scorer, src, **lengths)
    return beam_search(
        scorer,
        src,
        beam_size=cfg.beam_size,
        n_best=min(cfg.n_best, cfg.beam_size),
        length_penalty=cfg.length_penalty,
        lp_style=cfg.lp_style,
        early_stop=cfg.early_stop,
        constraints=constraints,
        **lengths,
    )


def fit_source(ids: list[int], limit: int, line: int, eos: int = EOS) -> list[int]:
    """Sources longer than the model's positions are cut (keeping EOS), with a warning:
    one over-long line must not stop a whole file."""
    if len(ids) <= limit:
        return ids
    log.warning(
        "input line %d has %d subwords, more than model.max_positions=%d: translating its first %d",
        line,
        len(ids),
        limit,
        limit - 1,
    )
    return ids[: limit - 1] + [eos]


def packs_weights(cfg: DecodeConfig, device: torch.device) -> bool:
    """Whether fp32 search on this device may run on oneDNN-packed weights (``cfg`` resolved)."""
    return cfg.prepack != "false" and device.type == "cpu" and cfg.precision == "fp32" and cfg.quantize != "int8"


def pack_models(models: Sequence[Transformer], cfg: DecodeConfig) -> list[Transformer]:
    """Copies of ``models`` with linear weights packed for oneDNN: all of them
    (``prepack=true``) or the layer shapes that time faster on oneDNN here (``auto``)."""
    return [
        packed_for_cpu(m, None if cfg.prepack == "true" else onednn_shapes(m, rows=256, training=False)) for m in models
    ]


def prepare_models(models: Sequence[Transformer], cfg: DecodeConfig, device: torch.device) -> list[Transformer]:
    """The models search runs on under ``cfg`` (resolved): int8 copies, packed copies, or themselves."""
    if cfg.quantize == "int8":
        return [quantized_for_cpu(m) for m in models]
    if packs_weights(cfg, device):
        return pack_models(models, cfg)
    return list(models)


def check_prefixes(
    src_ids: Sequence[list[int]], prefixes: Sequence[list[int]], cfg: DecodeConfig, limit: int, first_line: int
) -> None:
    """A forced prefix must leave room for EOS within its line's output limit: one error
    line naming the input line (cutting the prefix would silently break its promise)."""
    longest = max_lengths(torch.tensor([len(s) for s in src_ids]), cfg.max_len_a, cfg.max_len_b, limit - 1)
    for i, (prefix, most) in enumerate(zip(prefixes, longest.tolist())):
        if len(prefix) >= most:
            raise UserError(
                f"input line {first_line + i}: its forced prefix has {len(prefix)} subwords, but the line's output is "
                f"limited to {most} with EOS (decode.max_len_a, decode.max_len_b): shorten the prefix or raise the limit"
            )


def check_guides(
    src_ids: Sequence[list[int]],
    prefixes: Sequence[list[int]] | None,
    constraints: Sequence[list[list[int]]] | None,
    cfg: DecodeConfig,
    limit: int,
    first_line: int,
) -> None:
    """Prefixes and constraints fit the sources and the search before any search starts."""
    for name, guide in (("prefixes", prefixes), ("constraint lists", constraints)):
        if guide is not None and len(guide) != len(src_ids):
            raise UserError(f"{len(guide)} {name} for {len(src_ids)} sentences: give one per sentence")
    if prefixes is not None:
        check_prefixes(src_ids, prefixes, cfg, limit, first_line)
    if constraints is not None and cfg.sampling and any(any(c) for c in constraints):
        raise UserError("lexical constraints need beam search: set decode.sampling=false")


def translate_ids(
    models: Sequence[Transformer],
    src_ids: Sequence[list[int]],
    cfg: DecodeConfig,
    cached: bool = True,
    first_line: int = 1,
    prefixes: Sequence[list[int]] | None = None,
    constraints: Sequence[list[list[int]]] | None = None,
    shortlist: Shortlist | None = None,
) -> list[list[Hypothesis]]:
    """Hypotheses for every source (id lists ending in EOS), in input order; warnings number
    the sources from ``first_line``. ``prefixes`` (target ids, without BOS) and ``constraints``
    (target id phrases) hold one entry per source, empty for none. ``shortlist``: the table
    decode.shortlist resolved to (default: a path in decode.shortlist, none for auto)."""
    check_decode_config(cfg)
    model = models[0]
    device = next(model.parameters()).device
    cfg = resolve_decode(cfg, device, model)
    shortlist = shortlist or resolve_shortlist(cfg, None, model.cfg.tgt_vocab_size)
    log_choice(cfg.precision, cfg.quantize, "a vocabulary shortlist" if shortlist else "the full vocabulary")
    limit, specials = model.cfg.max_positions, model.specials
    src_ids = [fit_source(ids, limit, first_line + i, specials.eos) for i, ids in enumerate(src_ids)]
    check_guides(src_ids, prefixes, constraints, cfg, limit, first_line)
    if cfg.alignment and cfg.alignment_layer >= model.cfg.n_decoder_layers:
        layers = model.cfg.n_decoder_layers
        raise UserError(f"decode.alignment_layer={cfg.alignment_layer}: the model has {layers} decoder layers")
    models = prepare_models(models, cfg, device)
    align_layer = cfg.alignment_layer if cfg.alignment else None
    results: list[list[Hypothesis] | None] = [None] * len(src_ids)
    with torch.inference_mode(), autocast(device, cfg.precision, "decode.precision"):
        for batch in token_batches([len(s) for s in src_ids], cfg.batch_tokens, 0, 0, shuffle=False):
            src = pad([src_ids[i] for i in batch], specials.pad).to(device)
            guides = {
                "prefix": None if prefixes is None else [prefixes[i] for i in batch],
                "constraints": None if constraints is None else [constraints[i] for i in batch],
            }
            vocab = None
            if shortlist is not None:
                vocab = shortlist.candidates(src, required_tokens(specials.eos, specials.forced_bos, *guides.values()))
            scorer = make_scorer(models, cached, align_layer, vocab)
            for i, hyps in zip(batch, search(scorer, src, cfg, limit, specials, **guides)):
                results[i] = hyps
                if hyps and not hyps[0].constraints_met:
                    log.warning(
                        "input line %d: no output within the length limit holds every constraint", first_line + i
                    )
    return results  # type: ignore[return-value]


def target_ids(tokenizer: Tokenizer, texts: Sequence[str], keep_start: bool) -> list[list[int]]:
    """Target ids of ``texts`` without BOS and EOS. The tokenizer's own start tokens (M2M100's
    target language) are kept only with ``keep_start``: a forced prefix begins with them, a
    constraint phrase does not."""
    start = 1 + (0 if keep_start else tokenizer.tgt_start)
    return [ids[start:-1] if text else [] for text, ids in zip(texts, tokenizer.encode_tgt(list(texts)))]


def line_guides(cfg: DecodeConfig) -> Iterator[tuple[str | None, list[str]]]:
    """Per input line: its forced prefix from decode.prefix_file (None without the file, ""
    for none) and its constraint phrases from decode.constraints_file (tab-separated)."""
    files = [(key, getattr(cfg, key)) for key in ("prefix_file", "constraints_file")]
    readers = [(line for _, line in open_text(path)) if path else itertools.repeat(None) for _, path in files]
    for number, (prefix, phrases) in enumerate(zip(*(itertools.chain(r, [False]) for r in readers)), start=1):
        for (key, path), value in zip(files, (prefix, phrases)):
            if value is False:
                raise UserError(f"decode.{key}={path} has {number - 1} lines, fewer than the input: give one per line")
        yield prefix, [p for p in (phrases or "").split("\t") if p.strip()]


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
        empty hypotheses (score 0), whatever the search made of it (it keeps its line number)."""
        cfg = self.options(**overrides)
        tag = tag_prefix(self.tokenizer, cfg.tgt_lang)  # a multilingual model's <2xx> for decode.tgt_lang
        src_ids = [tag + ids for ids in self.tokenizer.encode_src(sentences)]
        prefixes = self.prefix_ids(cfg, prefix, len(src_ids))
        phrases = (
            None if constraints is None else [target_ids(self.tokenizer, c, keep_start=False) for c in constraints]
        )
        results = translate_ids(
            self.search_models(cfg),
            src_ids,
            cfg,
            first_line=first_line,
            prefixes=prefixes,
            constraints=phrases,
            shortlist=self.shortlist(cfg),
        )
        out = []
        for sentence, ids, hyps in zip(sentences, src_ids, results):
            texts = self.tokenizer.decode_tgt([h.tokens for h in hyps])
            source_words = self.source_words(sentence, ids) if cfg.alignment else []
            out.append(
                [
                    Translation(
                        text,
                        h.score,
                        h.log_prob,
                        self.tokenizer.tgt_pieces(h.tokens),
                        self.attention(ids, h.tokens, attention_layer, attention_head) if attention else None,
                        None if h.alignment is None else word_pairs(h.alignment, source_words, self.target_words(h)),
                    )
                    for text, h in zip(texts, hyps)
                ]
            )
        empty = Translation("", 0.0, 0.0, [], torch.zeros(0, 0) if attention else None, [] if cfg.alignment else None)
        return [[empty] * cfg.n_best if not sentence.strip() else hyps for sentence, hyps in zip(sentences, out)]

    def prefix_ids(self, cfg: DecodeConfig, prefix: str | Sequence[str] | None, n: int) -> list[list[int]] | None:
        """Target ids (without BOS) of the forced prefixes of ``n`` sentences: ``prefix`` for
        all, one per sentence, or (None) decode.prefix; None without any."""
        prefix = cfg.prefix if prefix is None else prefix
        texts = [prefix] * n if isinstance(prefix, str) else prefix
        return None if texts is None else target_ids(self.tokenizer, texts, keep_start=True)

    def source_words(self, sentence: str, ids: list[int]) -> list[int | None]:
        """Word index of each of the source ``ids`` of ``sentence`` (language tags, also ones
        put before the tokenizer's ids, and EOS: None)."""
        pieces = self.tokenizer.src_pieces(sentence)
        tags = [None] * (len(ids) - len(pieces))
        return tags + word_indices(pieces, self.tokenizer.src_start, len(pieces) - 1)

    def target_words(self, hypothesis: Hypothesis) -> list[int | None]:
        """Word index of each generated subword (language tag and EOS: None)."""
        tokens, eos = hypothesis.tokens, self.models[0].specials.eos
        end = len(tokens) - (1 if tokens and tokens[-1] == eos else 0)
        return word_indices(self.tokenizer.tgt_pieces(tokens), self.tokenizer.tgt_start, end)

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

    @torch.inference_mode()
    def attention(self, src_ids: list[int], tgt_ids: list[int], layer: int = -1, head: int = -1) -> Tensor:
        """Cross-attention (T, S) of the first model for a forced target (row t: the step that
        produced tgt_ids[t]) in decoder ``layer`` and ``head`` (-1: the mean over all);
        every row sums to one."""
        model = self.models[0]
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
