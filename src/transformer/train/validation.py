"""Validation during training: the loss on the validation pairs and the BLEU of a search;
the one place train/ calls decoding."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace

import sacrebleu
import torch

from transformer.config import DecodeConfig, TrainConfig
from transformer.data.batching import Example, collate, token_batches
from transformer.data.tokenizer import Tokenizer
from transformer.decode.batching import translate_ids
from transformer.model import Transformer
from transformer.runtime import autocast
from transformer.train.examples import RunData
from transformer.train.loss import label_smoothed_loss
from transformer.train.runlog import RunLog
from transformer.train.state import Progress

log = logging.getLogger(__name__)


@torch.no_grad()
def valid_loss(
    model: Transformer, examples: Sequence[Example], max_tokens: int, device: torch.device, precision: str
) -> float:
    """Mean NLL per target token (no label smoothing) over ``examples``."""
    model.eval()
    total, count = 0.0, 0
    for b in token_batches([(len(e.src), len(e.tgt)) for e in examples], max_tokens, 0, 0, shuffle=False):
        batch = collate([examples[i] for i in b], model.cfg.pad_id).to(device)
        with autocast(device, precision):
            keep = batch.tgt_out != batch.pad_id
            _, nll = label_smoothed_loss(model(batch.src, batch.tgt_in, keep), batch.tgt_out[keep], 0.0)
        total += nll.item()
        count += batch.n_tokens
    return total / max(count, 1)


def eval_decode_config(cfg: TrainConfig) -> DecodeConfig:
    """The search of validation BLEU: cfg.decode with trainer.eval_beam_size, one hypothesis."""
    return replace(cfg.decode, beam_size=cfg.trainer.eval_beam_size, n_best=1, sampling=False)


def valid_bleu(
    model: Transformer,
    tokenizer: Tokenizer,
    source_ids: Sequence[list[int]],
    references: Sequence[str],
    decode_cfg: DecodeConfig,
) -> tuple[float, list[str]]:
    """Corpus BLEU of the search's translations of ``source_ids``, and the translations."""
    hyps = translate_ids([model], source_ids, decode_cfg)
    texts = tokenizer.decode_tgt([h[0].tokens for h in hyps])
    return sacrebleu.corpus_bleu(texts, [list(references)]).score, texts


def pair_bleu(texts: Sequence[str], references: Sequence[str], groups: dict[str, list[int]]) -> dict[str, float]:
    """``valid_bleu_<pair>``: the BLEU of each language pair's sentences (multilingual runs)."""
    return {
        f"valid_bleu_{pair}": sacrebleu.corpus_bleu([texts[i] for i in idx], [[references[i] for i in idx]]).score
        for pair, idx in groups.items()
    }


def valid_record(step: int, minutes: float, nll: float, bleu: float) -> dict:
    return {
        "step": step,
        "minutes": round(minutes, 3),
        "valid_nll": nll,
        "valid_ppl": math.exp(min(nll, 50)),
        "valid_bleu": bleu,
    }


def samples_text(sources: Sequence[str], references: Sequence[str], hypotheses: Sequence[str], n: int = 3) -> str:
    """The first ``n`` translations, for TensorBoard."""
    return "\n\n".join(
        f"    src: {s}\n    ref: {r}\n    hyp: {h}" for s, r, h in list(zip(sources, references, hypotheses))[:n]
    )


def validate(
    model: Transformer,
    data: RunData,
    cfg: TrainConfig,
    progress: Progress,
    runlog: RunLog,
    device: torch.device,
    precision: str,
) -> None:
    """Validation NLL and BLEU of ``model`` on ``data``: ``progress`` records the best BLEU and
    the evaluations without gain, ``runlog`` gets the record. In a multilingual run the
    record also holds each pair's BLEU; the overall one (all pairs' sentences together) is
    what best checkpoints and early stopping follow."""
    p, tokenizer = progress, data.tokenizer
    nll = valid_loss(model, data.valid_examples, cfg.data.max_tokens, device, precision)
    bleu, texts = valid_bleu(model, tokenizer, data.valid_source_ids, data.valid_refs, eval_decode_config(cfg))
    if bleu > p.best_bleu:
        p.best_bleu, p.best_step, p.evals_without_gain = bleu, p.step, 0
    else:
        p.evals_without_gain += 1
    pairs = pair_bleu(texts, data.valid_refs, data.valid_groups)
    record = valid_record(p.step, p.elapsed / 60, nll, bleu) | pairs
    runlog.log("valid", record, samples_text(data.valid_sources, data.valid_refs, texts))
    log.info(
        "step %d: valid nll %.4f ppl %.2f BLEU %.2f (best %.2f at step %d)%s",
        *(p.step, nll, record["valid_ppl"], bleu, p.best_bleu, p.best_step),
        "".join(f"; {key.removeprefix('valid_bleu_')} {value:.2f}" for key, value in pairs.items()),
    )
