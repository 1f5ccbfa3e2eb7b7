"""``serve.engine=ctranslate2``: a checkpoint served by CTranslate2's runtime behind the
same interface as ``Translator`` (``options``, ``hypotheses``, ``tokenizer``), so the server's
API, batching, limits and page stay the same.

The checkpoint is exported (``transformer.export``) and converted once; the conversion is
cached beside it (``<checkpoint stem>.ct2/``, rebuilt when the checkpoint is newer) and
written atomically. Tokenization, detokenization and the length limits are ours, so the
engine answers the texts ``transformer-decode`` gives under the same settings. What
CTranslate2 cannot do the same way is refused naming the setting: the GNMT length penalty
and the exact early stop (set ``decode.lp_style=average`` or ``none`` and
``decode.early_stop=fairseq``), lexical constraints, forced prefixes, alignments and
attention, several samples per sentence, and language-tagged multilingual models.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from transformer.checkpoint import load_model, resolve_checkpoint
from transformer.config import DecodeConfig
from transformer.data.tokenizer import Tokenizer
from transformer.decode.rules import length_penalty
from transformer.decode.spec import check_decode_config
from transformer.decode.translator import Request, Translation, Translator
from transformer.errors import UserError
from transformer.model import Transformer

log = logging.getLogger(__name__)

NEVER = [["<pad>"], ["<s>"]]  # PAD and BOS are never generated (search.py's rule)


def converted_dir(checkpoint: str | Path, quantization: str | None = None) -> Path:
    """The CTranslate2 conversion of a checkpoint, beside it: built on first use, reused while
    newer than the checkpoint; a crash while converting leaves no half-written directory."""
    from transformer.export import convert_ct2, export

    source = resolve_checkpoint(str(checkpoint))
    target = source.with_name(f"{source.stem}.ct2{'-' + quantization if quantization else ''}")
    if (target / "model.bin").is_file() and target.stat().st_mtime >= source.stat().st_mtime:
        return target
    log.info("converting %s for CTranslate2 into %s", source, target)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=source.parent) as tmp:
        converted = convert_ct2(export(str(source), str(Path(tmp) / "hf")), Path(tmp) / "ct2", quantization)
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            os.replace(target, old)
        os.replace(converted, target)
        shutil.rmtree(old, ignore_errors=True)
    return target


def unsupported(cfg: DecodeConfig, attention: bool = False, constraints: Any = None, prefix: Any = None) -> str | None:
    """The first setting CTranslate2 cannot honour the way our search does, as one line
    ``decode.FIELD=VALUE: why`` (``attention``, ``constraints``, ``prefix``: a call's own)."""
    forced = cfg.prefix if prefix is None else prefix
    checks = (
        ("lp_style", cfg.lp_style, cfg.lp_style == "gnmt", "the GNMT length penalty (set lp_style=average or none)"),
        ("early_stop", cfg.early_stop, cfg.early_stop != "fairseq", "the exact early stop (set early_stop=fairseq)"),
        ("alignment", True, cfg.alignment or attention, "alignments and attention"),
        ("constraints", constraints, bool(constraints and any(constraints)), "lexical constraints"),
        ("n_best", cfg.n_best, cfg.sampling and cfg.n_best > 1, "several samples per sentence"),
        ("prefix", forced, bool(forced and any(forced)), "forced prefixes (it ranks the beams after them otherwise)"),
    )
    for field, value, bad, why in checks:
        if bad:
            return f"decode.{field}={value}: serve.engine=ctranslate2 does not support {why}"
    return None


class CT2Translator(Translator):
    """A ``Translator`` whose search runs in CTranslate2 (``models`` keeps our model, on the
    CPU, for its description only; ``model`` and ``tokenizer``: the checkpoint's, if loaded)."""

    def __init__(
        self,
        checkpoint: str | Path,
        config: DecodeConfig | None = None,
        threads: int = 0,
        model: Transformer | None = None,
        tokenizer: Tokenizer | None = None,
    ):
        try:
            import ctranslate2
        except ImportError:
            raise UserError("serve.engine=ctranslate2 needs ctranslate2: pip install 'transformer[ct2]'") from None
        if model is None or tokenizer is None:
            model, tokenizer, _ = load_model(checkpoint)
        super().__init__([model], tokenizer, config, checkpoint=checkpoint)
        if tokenizer.languages:
            raise UserError("serve.engine=ctranslate2 serves models without language tags: use serve.engine=torch")
        self.check(self.config)
        quantize = "int8" if self.config.quantize == "int8" else None
        self.engine = ctranslate2.Translator(
            str(converted_dir(checkpoint, quantize)), device="cpu", intra_threads=threads or torch.get_num_threads()
        )
        pieces = tokenizer.tgt_pieces(range(tokenizer.tgt_vocab_size))
        self.tgt_ids = {p: i for i, p in reversed(list(enumerate(pieces)))}  # the first id of a piece, as encoding

    @staticmethod
    def check(cfg: DecodeConfig, attention: bool = False, constraints: Any = None, prefix: Any = None) -> None:
        """One error naming the decode setting CTranslate2 cannot honour (a request's: 422)."""
        check_decode_config(cfg)
        refused = unsupported(cfg, attention, constraints, prefix)
        if refused:
            raise UserError(refused)

    def options(self, **overrides: Any) -> DecodeConfig:
        cfg = super().options(**overrides)
        self.check(cfg)
        return cfg

    def translations(self, sentences: Sequence[str], cfg: DecodeConfig, request: Request) -> list[list[Translation]]:
        """n-best Translations per sentence, best first, as ``Translator.hypotheses`` (whose
        signature this engine keeps: it implements only this step)."""
        self.check(cfg, request.attention, request.constraints, request.prefix)
        source = [self.tokenizer.src_pieces(s) for s in sentences]
        limits = [self.limit(len(s), cfg) for s in source]
        out: list[list[Translation]] = [[] for _ in sentences]
        for limit in sorted(set(limits)):  # CTranslate2's length limit is per batch: one call per limit
            rows = [i for i, n in enumerate(limits) if n == limit]
            results = self.engine.translate_batch([source[i] for i in rows], **self.search_options(cfg, limit))
            for i, result in zip(rows, results):
                out[i] = [
                    self.translation(tokens, score, cfg) for tokens, score in zip(result.hypotheses, result.scores)
                ]
        return out

    def limit(self, source_length: int, cfg: DecodeConfig) -> int:
        """Our per-sentence output limit, EOS included (search.max_lengths)."""
        most = math.floor(cfg.max_len_a * source_length + cfg.max_len_b)
        return max(1, min(most, self.models[0].cfg.max_positions - 1))

    @staticmethod
    def search_options(cfg: DecodeConfig, limit: int) -> dict[str, Any]:
        sampling = cfg.sampling
        return dict(
            beam_size=1 if sampling else cfg.beam_size,
            num_hypotheses=1 if sampling else min(cfg.n_best, cfg.beam_size),
            length_penalty=cfg.length_penalty if cfg.lp_style == "average" else 0.0,
            max_decoding_length=limit - 1,  # CTranslate2 stops there without EOS, where we force EOS
            min_decoding_length=cfg.min_len,
            suppress_sequences=NEVER,
            return_end_token=True,
            return_scores=True,
            sampling_topk=(cfg.top_k or 0) if sampling else 1,
            sampling_topp=cfg.top_p if sampling else 1.0,
            sampling_temperature=cfg.temperature if sampling else 1.0,
        )

    def translation(self, tokens: list[str], score: float, cfg: DecodeConfig) -> Translation:
        """One CTranslate2 hypothesis as ours: detokenized text, score and log-prob (the score
        times the length penalty it was divided by), ending with EOS (stopped at the length
        limit: EOS appended, without its log-prob)."""
        eos = self.tokenizer.tgt_pieces([self.models[0].specials.eos])[0]
        tokens = tokens if tokens and tokens[-1] == eos else [*tokens, eos]
        ids = [self.tgt_ids.get(p, 0) for p in tokens]
        alpha = cfg.length_penalty if cfg.lp_style == "average" and not cfg.sampling else 0.0
        log_prob = score * float(length_penalty(len(ids), alpha, "average"))
        return Translation(self.tokenizer.decode_tgt([ids])[0], score, log_prob, tokens)
