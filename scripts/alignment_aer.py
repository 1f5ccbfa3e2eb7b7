"""Alignment error rate (AER, Och & Ney 2003) of decode.alignment on a gold set built by rule.

The built-in corpus is generated from templates whose word correspondences are known: an
English number phrase ("three hundred forty-five") is one German compound
("dreihundertfünfundvierzig"), and every other word has exactly one German counterpart in
the same order ("I have three red apples." -> "Ich habe drei rote Äpfel."; "one" before a
noun -> the article "einen"). Collapsing each English number phrase into one chunk makes
the two sides the same length; each English word of chunk k is aligned to German word k,
all links sure. Pairs where the chunk counts differ would break the rule and are skipped.

Alignments are read while the model is forced to produce the reference (decode.prefix set
to it, greedy), so they are the model's links for the gold target; words are
whitespace-separated tokens, as decode.alignment counts them (SentencePiece's ▁ marks).

    python scripts/alignment_aer.py                      # trains a builtin model in runs/aer first
    python scripts/alignment_aer.py --run runs/builtin   # or reports on an existing run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from transformer import Translator
from transformer.config import DecodeConfig
from transformer.data.builtin import builtin_splits, number_to_english
from transformer.decode.alignment import word_indices
from transformer.decode.batching import translate_ids
from transformer.decode.guides import target_ids

NUMBER_WORDS = {w for n in range(1000) for w in number_to_english(n).replace("-", " ").split()} | {"thousand"}


def is_number_word(word: str) -> bool:
    return all(part in NUMBER_WORDS for part in word.split("-"))


def gold_alignment(english: str, german: str) -> set[tuple[int, int]] | None:
    """Sure links (English word, German word) by the corpus's rule; None where it does not apply."""
    chunks: list[list[int]] = []
    words = english.split()
    for i, word in enumerate(words):
        if chunks and is_number_word(word) and is_number_word(words[i - 1]):
            chunks[-1].append(i)
        else:
            chunks.append([i])
    if len(chunks) != len(german.split()):
        return None
    return {(i, j) for j, chunk in enumerate(chunks) for i in chunk}


def gold_set(n: int, seed: int) -> list[tuple[str, str, set[tuple[int, int]]]]:
    """The first n test pairs of the default builtin splits that the rule covers."""
    test = builtin_splits(20000, 500, 500, seed)["test"]
    covered = [(en, de, gold) for en, de in test if (gold := gold_alignment(en, de)) is not None]
    return covered[:n]


def predicted(translator: Translator, english: str, german: str, layer: int) -> set[tuple[int, int]]:
    """The model's word links for the reference ``german``, from the forced prefix's steps."""
    tokenizer = translator.tokenizer
    src = tokenizer.encode_src([english])
    prefix = target_ids(tokenizer, [german], keep_start=True)
    cfg = DecodeConfig(beam_size=1, precision="fp32", alignment=True, alignment_layer=layer, max_len_b=256)
    hyp = translate_ids(translator.models, src, cfg, prefixes=prefix)[0][0]
    pieces = tokenizer.src_pieces(english)
    source_words = word_indices(pieces, 0, len(pieces) - 1)
    target_words = word_indices(tokenizer.tgt_pieces(prefix[0]), 0, len(prefix[0]))
    links = hyp.alignment[: len(prefix[0])]  # type: ignore[index]
    return {(source_words[s], target_words[t]) for t, s in enumerate(links) if source_words[s] is not None}  # type: ignore[misc]


def aer(sure: list[set], found: list[set]) -> float:
    """1 - 2 |A & S| / (|A| + |S|) summed over the corpus (possible links = sure links)."""
    hits = sum(len(a & s) for a, s in zip(found, sure))
    return 1.0 - 2.0 * hits / (sum(map(len, found)) + sum(map(len, sure)))


def train_run(run_dir: str, steps: int, minutes: float) -> None:
    """The builtin experiment (make train's), shortened to ``steps`` or ``minutes``."""
    train = Path(sys.executable).parent / "transformer-train"
    overrides = [f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", f"trainer.max_minutes={minutes}"]
    overrides.append("trainer.progress=false")
    subprocess.run(
        [str(train), "experiment=builtin", *overrides, "evaluate_test=false", f"run_dir={run_dir}"],
        check=True,
        env=os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a trained run directory or checkpoint (default: train one in runs/aer)")
    parser.add_argument("--steps", type=int, default=800, help="training steps when no --run is given")
    parser.add_argument("--minutes", type=float, default=0.0, help="or stop training after this long (0: no limit)")
    parser.add_argument("--pairs", type=int, default=50, help="gold sentence pairs")
    parser.add_argument("--seed", type=int, default=1234, help="data.builtin_seed of the run")
    args = parser.parse_args()
    run = args.run
    if run is None:
        run = "runs/aer"
        if not Path(run, "checkpoints", "best.pt").exists():
            train_run(run, args.steps, args.minutes)
    translator = Translator.from_checkpoint(run, device="cpu")
    gold = gold_set(args.pairs, args.seed)
    sure = [g for _, _, g in gold]
    rows = {}
    for layer in range(translator.models[0].cfg.n_decoder_layers):
        found = [predicted(translator, en, de, layer) for en, de, _ in gold]
        rows[f"layer {layer}"] = round(aer(sure, found), 4)
    diagonal = [{(j, j) for j in range(len(de.split()))} for _, de, _ in gold]  # baseline: word j to word j
    rows["diagonal baseline"] = round(aer(sure, diagonal), 4)
    print(json.dumps({"run": str(run), "pairs": len(gold), "aer": rows}, indent=1))


if __name__ == "__main__":
    main()
