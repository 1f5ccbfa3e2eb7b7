"""``transformer-shortlist``: build a checkpoint's vocabulary shortlist from its training
data, measure what it costs in BLEU on the validation split, and store it beside the
checkpoint (``decode.shortlist=auto`` finds it there; decode/shortlist.py says how it works).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from omegaconf import MISSING

from transformer.checkpoint import load_model
from transformer.config import DataConfig, DecodeConfig
from transformer.data.sources import load_split
from transformer.data.tokenizer import Tokenizer
from transformer.decode.batching import translate_ids
from transformer.decode.shortlist import Shortlist, beside, build_shortlist, save_shortlist
from transformer.errors import UserError
from transformer.evaluate import score
from transformer.model import Transformer

USAGE = """usage: transformer-shortlist checkpoint=RUN_DIR_OR_PT [k=50] [frequent=100] [valid_sentences=500] [output=PATH]

Builds a vocabulary shortlist from the run's training data (per source subword its k most associated target
subwords, plus the most frequent ones), measures its BLEU loss on the validation split with the run's decode
settings, and writes it beside the checkpoint (shortlist.pt) for decode.shortlist=auto or decode.shortlist=PATH."""


@dataclass
class ShortlistConfig:
    checkpoint: str = MISSING  # run directory (uses best.pt) or checkpoint file
    k: int = 50  # target subwords kept per source subword
    frequent: int = 100  # most frequent target subwords every batch keeps
    valid_sentences: int = (
        500  # validation sentences the BLEU loss is measured on (0: not measured, auto never uses it)
    )
    output: str | None = None  # where to write it (default: shortlist.pt beside the checkpoint)


def bleu_loss(
    model: Transformer, tokenizer: Tokenizer, shortlist: Shortlist, data: DataConfig, decode: DecodeConfig, n: int
) -> dict:
    """Validation BLEU of the full vocabulary and of the shortlist (first ``n`` sentences, exact fp32 search)."""
    pairs = load_split(data, "valid")[:n]
    if not pairs:
        raise UserError(f"data {data.name}: no validation sentences to measure the shortlist on (valid_sentences=0)")
    src = tokenizer.encode_src([s for s, _ in pairs])
    refs = [t for _, t in pairs]
    cfg = replace(decode, precision="fp32", quantize="none", shortlist="none")
    full, short = (
        tokenizer.decode_tgt([h[0].tokens for h in translate_ids([model], src, cfg, shortlist=table)])
        for table in (None, shortlist)
    )
    return {"full": score(full, refs)["bleu"], "shortlist": score(short, refs)["bleu"], "sentences": len(pairs)}


def run_shortlist(cfg: ShortlistConfig) -> Path:
    if cfg.k < 1 or cfg.frequent < 0 or cfg.valid_sentences < 0:
        raise UserError(
            f"k={cfg.k} must be >= 1, frequent={cfg.frequent} and valid_sentences={cfg.valid_sentences} >= 0"
        )
    model, tokenizer, config = load_model(cfg.checkpoint)
    if "data" not in config:
        raise UserError(
            f"checkpoint={cfg.checkpoint}: holds no training data config (an imported model?) to build from"
        )
    data = DataConfig(**config["data"])
    pairs = load_split(data, "train")
    src, tgt = tokenizer.encode_pairs(pairs)
    table = build_shortlist(
        src,
        tgt,
        tokenizer.src_vocab_size,
        tokenizer.tgt_vocab_size,
        cfg.k,
        cfg.frequent,
        never=model.specials.never_generated,
    )
    output = Path(cfg.output) if cfg.output else beside(cfg.checkpoint)
    if cfg.valid_sentences > 0:
        known = {f.name for f in fields(DecodeConfig)}
        decode = DecodeConfig(**{k: v for k, v in config.get("decode", {}).items() if k in known})
        measured = bleu_loss(model, tokenizer, table, data, decode, cfg.valid_sentences)
        table.bleu_loss = round(measured["full"] - measured["shortlist"], 2)
        print(
            f"validation BLEU on {measured['sentences']} sentences: full vocabulary {measured['full']:.2f}, "
            f"shortlist {measured['shortlist']:.2f} (loss {table.bleu_loss:.2f})"
        )
    save_shortlist(table, output)
    print(f"shortlist of {len(pairs)} training pairs (k={cfg.k}, {cfg.frequent} frequent): {output}")
    return output
