"""Score translations with sacreBLEU (BLEU and chrF on detokenized text, with signatures)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sacrebleu
from omegaconf import DictConfig

from transformer.config import DataConfig, DecodeConfig, TrainConfig, typed
from transformer.data.corpus import load_files
from transformer.data.sources import split_parts
from transformer.decode.translator import Translator
from transformer.errors import UserError
from transformer.rundir import TEST_HYPOTHESES, atomic_write
from transformer.train.loop import train  # before the package binds its name `train` to train_and_test

log = logging.getLogger(__name__)


def score(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU (cased, 13a) and chrF with their signatures, plus lowercased BLEU."""
    bleu = sacrebleu.metrics.BLEU()
    bleu_lc = sacrebleu.metrics.BLEU(lowercase=True)
    chrf = sacrebleu.metrics.CHRF()
    refs = [list(references)]
    b, lc, c = (
        bleu.corpus_score(hypotheses, refs),
        bleu_lc.corpus_score(hypotheses, refs),
        chrf.corpus_score(hypotheses, refs),
    )
    return {
        "bleu": round(b.score, 2),
        "bleu_lc": round(lc.score, 2),
        "chrf": round(c.score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "bleu_detail": str(b),
        "sentences": len(hypotheses),
    }


def pair_scores(parts: Sequence[tuple[str, str | None, list]], hypotheses: Sequence[str]) -> dict:
    """score() of each language pair's sentences (split_parts order; a pair may span corpora)."""
    hyps, refs, start = {}, {}, 0
    for pair, _, pairs in parts:
        hyps.setdefault(pair, []).extend(hypotheses[start : start + len(pairs)])
        refs.setdefault(pair, []).extend(t for _, t in pairs)
        start += len(pairs)
    return {pair: score(hyps[pair], refs[pair]) for pair in hyps}


def evaluate(
    checkpoint: str,
    *,
    data: DataConfig | None = None,
    split: str = "test",
    src_file: str | None = None,
    ref_file: str | None = None,
    decode: DecodeConfig | None = None,
    output: str | None = None,
    device: str = "auto",
    translator: Translator | None = None,
    ensemble: Sequence[str] = (),
) -> dict:
    """Translate a data split (or ``src_file``) and score it against its references, with
    ``checkpoint`` alone or ensembled with the ``ensemble`` checkpoints. Hypotheses go to
    ``output`` (default: next to the checkpoint); scores are returned and written beside
    them as JSON."""
    translator = translator or Translator.from_checkpoint(checkpoint, device=device, ensemble=ensemble, config=decode)
    if src_file:
        if not ref_file:
            raise UserError("ref_file is required with src_file")
        sources, references = load_files(src_file, ref_file)
        parts: list[tuple[str, str | None, list[tuple[str, str]]]] = [("", None, list(zip(sources, references)))]
        name = Path(src_file).name
    else:
        if data is None:
            raise UserError("give a data config (data=...) or src_file= and ref_file=")
        parts = split_parts(data, split)  # (pair, tgt_lang, pairs) per corpus; one ("", None, pairs) for one corpus
        name = f"{data.name}.{split}"
    references = [t for _, _, pairs in parts for _, t in pairs]
    hypotheses = [
        h
        for _, lang, pairs in parts
        for h in translator.translate([s for s, _ in pairs], tgt_lang=lang or translator.config.tgt_lang)
    ]
    result = score(hypotheses, references)
    if parts[0][0]:  # several corpora: each language pair scored alone too
        result["pairs"] = pair_scores(parts, hypotheses)
    cfg = translator.config
    result.update(
        checkpoint=str(checkpoint),
        ensemble=[str(e) for e in ensemble],
        data=name,
        beam_size=cfg.beam_size,
        length_penalty=cfg.length_penalty,
    )
    out = (
        Path(output)
        if output
        else Path(checkpoint if Path(checkpoint).is_dir() else Path(checkpoint).parent) / f"{name}.hyp.txt"
    )
    atomic_write(out, "".join(h + "\n" for h in hypotheses))
    atomic_write(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    result["hypotheses_file"] = str(out)
    log.info("%s: BLEU %.2f chrF %.2f (%s)", name, result["bleu"], result["chrf"], result["bleu_signature"])
    return result


def train_and_test(cfg: TrainConfig | DictConfig) -> dict:
    """transformer-train's recipe: train (train/loop.py), then score the test split with the
    best or averaged checkpoint and ``cfg.decode`` (skipped with evaluate_test=false)."""

    cfg = typed(cfg, TrainConfig)

    def test(final: Path, device: Any) -> dict:
        return evaluate(
            str(final),
            data=cfg.data,
            split="test",
            decode=cfg.decode,
            output=str(Path(cfg.run_dir) / TEST_HYPOTHESES),
            device=str(device),
        )

    return train(cfg, test)
