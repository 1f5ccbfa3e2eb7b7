"""Decoding speed and BLEU: our search against HF generate() on the exported model and
CTranslate2 (fp32 and int8) on its conversion; ours and HF also under bf16 autocast.

All systems read the same source ids (our SentencePiece), the same length-sorted batches
and the same limits (max 1.5 * source + 10 tokens, PAD and BOS never generated, score =
log-prob / length, a sentence stops once `beam` hypotheses finished), and all outputs are
detokenized by our tokenizer, so the table compares search and model execution only.
Each (system, beam) runs in its own subprocess with the same thread count, so its peak
memory is its own. Our rows run under the allocator our commands run under (mimalloc,
`allocator.use_fast_allocator`), HF's under the system one, as each is run out of the box.
Prints a markdown table with speed ratios against HF.

    python scripts/bench_decode.py                                 # runs/multi30k on Multi30k test2016
    python scripts/bench_decode.py --checkpoint runs/x --limit 300 --beam 5
    python scripts/bench_decode.py --train-tiny                    # no checkpoint: train a small builtin model first
    python scripts/bench_decode.py --hf opus-mt-en-de --limit 48   # a Hugging Face Marian directory, imported
    python scripts/bench_decode.py --make-opus-like runs/opus-random  # a random model of opus-mt-en-de's shapes
    python scripts/bench_decode.py --hf runs/opus-random --src none --max-len 24   # ... on the builtin test split

With ``--hf DIR`` the model is imported (transformer-import) for ours, HF generate() runs on
DIR itself and CTranslate2 on the stock conversion of DIR.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from transformer.allocator import active_allocator, allocator_env, mimalloc_library  # noqa: E402
from transformer.config import DataConfig, DecodeConfig  # noqa: E402
from transformer.data.batching import (
    pad,  # noqa: E402
    token_batches,  # noqa: E402
)
from transformer.data.corpus import load_files  # noqa: E402
from transformer.data.sources import load_split  # noqa: E402
from transformer.data.tokenizer import MappedTokenizer  # noqa: E402
from transformer.decode.batching import translate_ids  # noqa: E402
from transformer.decode.fast import resolve_shortlist  # noqa: E402
from transformer.decode.prepare import prepare_models, resolve_decode  # noqa: E402
from transformer.evaluate import score  # noqa: E402
from transformer.hardware import class_line, emulate_isa  # noqa: E402
from transformer.runtime import autocast  # noqa: E402
from transformer.vocab import Specials  # noqa: E402

# -bf16: bf16 autocast; ours-int8: decode.quantize=int8; ours-shortlist: decode.shortlist (built from the training data)
SYSTEMS = (
    "ours",
    "hf",
    "ct2-fp32",
    "ct2-int8",
    "ours-bf16",
    "hf-bf16",
    "ours-int8",
    "ours-shortlist",
    "ours-int8-shortlist",
)
TINY_RUN = "runs/bench-tiny"


def search_config(beam: int, batch_tokens: int) -> DecodeConfig:
    """Our settings that HF generate() and CTranslate2 also implement."""
    return DecodeConfig(
        beam_size=beam,
        lp_style="average",
        length_penalty=1.0,
        early_stop="fairseq",
        batch_tokens=batch_tokens,
        precision="fp32",
    )


def max_new_tokens(batch_ids: list[list[int]], cfg: DecodeConfig) -> int:
    """Our per-sentence limit (incl. EOS) for the longest source of a batch."""
    return int(math.floor(cfg.max_len_a * max(len(s) for s in batch_ids) + cfg.max_len_b))


def rss_mib() -> float:
    """Current resident set size."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def decode_ours(checkpoint: str, cfg: DecodeConfig, device: torch.device):
    from transformer.checkpoint import load_model

    model, _, _ = load_model(checkpoint)
    model = model.to(device)
    [model] = prepare_models([model], resolve_decode(cfg, device, model), device)  # once, as Translator does
    shortlist = resolve_shortlist(cfg, checkpoint, model.cfg.tgt_vocab_size)

    def run(ids: list[list[int]]) -> list[list[int]]:
        return [hyps[0].tokens for hyps in translate_ids([model], ids, cfg, shortlist=shortlist)]

    return run


def decode_hf(export_dir: str, cfg: DecodeConfig, specials: Specials, device: torch.device):
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(export_dir).eval().to(device)

    @torch.inference_mode()
    def run(ids: list[list[int]]) -> list[list[int]]:
        out: list = [None] * len(ids)
        for batch in token_batches([len(s) for s in ids], cfg.batch_tokens, 0, 0, shuffle=False):
            src = pad([ids[i] for i in batch], specials.pad).to(device)
            with autocast(src.device, cfg.precision):
                seqs = model.generate(
                    input_ids=src,
                    attention_mask=(src != specials.pad).long(),
                    num_beams=cfg.beam_size,
                    do_sample=False,
                    length_penalty=cfg.length_penalty,
                    early_stopping=True,
                    max_new_tokens=max_new_tokens([ids[i] for i in batch], cfg),
                    suppress_tokens=list(specials.never_generated),
                )
            for i, row in zip(batch, seqs[:, 1:].tolist()):
                out[i] = row[: row.index(specials.eos) + 1] if specials.eos in row else row
        return out

    return run


def decode_ct2(ct2_dir: str, cfg: DecodeConfig, threads: int, tokenizer, stock: bool = False, device: str = "cpu"):
    """``stock``: a conversion by CTranslate2's own Marian loader, whose vocabulary has no <pad>.
    On CUDA, CTranslate2's CUDA build (the PyPI wheel's) runs on the GPU."""
    import ctranslate2

    translator = ctranslate2.Translator(ct2_dir, device=device, inter_threads=1, intra_threads=threads)
    if isinstance(tokenizer, MappedTokenizer):
        src_piece, tgt_id = tokenizer.src_vocab.__getitem__, tokenizer.tgt_index.__getitem__
    else:
        src_piece, tgt_id = tokenizer.src.id_to_piece, tokenizer.tgt.piece_to_id
    suppress = None if stock else [["<pad>"], ["<s>"]]

    def run(ids: list[list[int]]) -> list[list[int]]:
        out: list = [None] * len(ids)
        for batch in token_batches([len(s) for s in ids], cfg.batch_tokens, 0, 0, shuffle=False):
            pieces = [[src_piece(t) for t in ids[i]] for i in batch]
            results = translator.translate_batch(
                pieces,
                beam_size=cfg.beam_size,
                length_penalty=cfg.length_penalty,
                min_decoding_length=0,
                max_decoding_length=max_new_tokens([ids[i] for i in batch], cfg),
                suppress_sequences=suppress,
                return_end_token=True,
            )
            for i, r in zip(batch, results):
                out[i] = [tgt_id(p) for p in r.hypotheses[0]]
        return out

    return run


def run_one(args) -> dict:
    """One (system, beam) in this process: warm up, decode everything, report."""
    from transformer.checkpoint import load_model

    torch.set_num_threads(args.threads)
    system, beam = args.run_one.split(":")
    cfg = search_config(int(beam), args.batch_tokens)
    if args.max_len:  # every system generates at most this many tokens per sentence
        cfg = replace(cfg, max_len_a=0.0, max_len_b=args.max_len)
    if system.endswith("-bf16"):
        cfg = replace(cfg, precision="bf16")
    if "int8" in system and system.startswith("ours"):
        cfg = replace(cfg, quantize="int8")
    if system.endswith("-shortlist"):
        cfg = replace(cfg, shortlist=args.shortlist)
    model, tokenizer, _ = load_model(args.checkpoint)
    specials = model.specials
    sources, references = load_files(args.src, args.ref)
    sources, references = sources[: args.limit or None], references[: args.limit or None]
    src_ids = tokenizer.encode_src(sources)
    device = torch.device(args.device)
    if system.startswith("ours"):
        run = decode_ours(args.checkpoint, cfg, device)
    elif system.startswith("hf"):
        run = decode_hf(args.export, cfg, specials, device)
    else:
        ct2_dir = args.ct2 + system[len("ct2") :]
        run = decode_ct2(ct2_dir, cfg, args.threads, tokenizer, stock=bool(args.hf), device=device.type)
    run(src_ids[:8])  # warm-up: lazy init, allocator
    before = rss_mib()
    start = time.perf_counter()
    if args.profile and system.startswith("ours"):
        outputs, split = profiled(run, src_ids)
    else:
        outputs, split = run(src_ids), {}
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None  # torch's (not CT2's)
    hyps = tokenizer.decode_tgt(outputs)
    tokens = sum(len([t for t in o if t not in (specials.eos, specials.pad, specials.bos)]) for o in outputs)
    return {
        "system": system,
        "beam": int(beam),
        "sentences": len(src_ids),
        "seconds": seconds,
        "sent_per_s": len(src_ids) / seconds,
        "tok_per_s": tokens / seconds,
        "rss_increase_mib": max(peak - before, 0.0),
        "gpu_peak_mib": gpu_mib,
        "bleu": score(hyps, references)["bleu"],
        "allocator": active_allocator(),
        **split,
    }


MATMULS = ("addmm", "mm", "bmm", "linear_pointwise", "qlinear_pointwise", "_int_mm")  # op names ending so


def profiled(run, src_ids: list[list[int]]) -> tuple[list[list[int]], dict]:
    """``run(src_ids)`` under the profiler, and its time per decoder step (one log-softmax per
    step) split into matrix products, attention and the rest (profiling slows everything alike)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        outputs = run(src_ids)
    ops = [e for e in prof.key_averages() if e.key.startswith(("aten::", "mkldnn::", "onednn::"))]
    total = sum(e.self_cpu_time_total for e in ops) / 1e3
    matmul = sum(e.self_cpu_time_total for e in ops if e.key.split("::")[1].endswith(MATMULS)) / 1e3
    attention = sum(e.self_cpu_time_total for e in ops if "attention" in e.key) / 1e3
    steps = max(sum(e.count for e in ops if e.key == "aten::_log_softmax"), 1)
    split = {"ms_per_step": total / steps, "matmul_ms": matmul / steps, "attention_ms": attention / steps}
    split["rest_ms"] = split["ms_per_step"] - split["matmul_ms"] - split["attention_ms"]
    return outputs, split


def train_tiny(run_dir: str) -> None:
    """A small builtin model (about 2 minutes on 2 cores), only to exercise the benchmark."""
    train = Path(sys.executable).parent / "transformer-train"
    subprocess.run(
        [
            str(train),
            "experiment=builtin",
            "trainer.max_steps=300",
            "trainer.eval_every=300",
            "trainer.warmup_steps=100",
            "trainer.progress=false",
            "evaluate_test=false",
            f"run_dir={run_dir}",
            f"hydra.run.dir={run_dir}",
        ],
        check=True,
    )


def builtin_test_files(directory: Path) -> tuple[str, str]:
    """The builtin corpus test split as two text files."""
    pairs = load_split(DataConfig(), "test")
    src, ref = directory / "builtin.test.en", directory / "builtin.test.de"
    src.write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    ref.write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    return str(src), str(ref)


def table(rows: list[dict]) -> str:
    hf = {r["beam"]: r for r in rows if r["system"] == "hf"}
    lines = [
        "| system | beam | sentences/s | target tokens/s | peak RSS +MiB | BLEU | speed vs HF |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = f"{r['sent_per_s'] / hf[r['beam']]['sent_per_s']:.2f}x" if r["beam"] in hf else "—"
        lines.append(
            f"| {r['system']} | {r['beam']} | {r['sent_per_s']:.1f} | {r['tok_per_s']:.0f} | {r['rss_increase_mib']:.0f} "
            f"| {r['bleu']:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def benchmark(args, work: Path) -> list[dict]:
    """Export and convert once, then every (system, beam) in its own subprocess."""
    from transformer.export import convert_ct2, export

    if args.hf:
        return benchmark_hf(args, work)
    if not Path(args.checkpoint).exists():
        if not Path(TINY_RUN, "checkpoints", "best.pt").exists():
            train_tiny(TINY_RUN)
        args.checkpoint = TINY_RUN
        args.src, args.ref = builtin_test_files(work)
    export_dir = export(args.checkpoint, str(work / "hf"))
    if any(s.endswith("-shortlist") for s in args.systems) and not args.shortlist:
        from transformer.shortlist import ShortlistConfig, run_shortlist

        args.shortlist = str(run_shortlist(ShortlistConfig(args.checkpoint, output=str(work / "shortlist.pt"))))
    if any(s.startswith("ct2") for s in args.systems):
        convert_ct2(export_dir, work / "ct2-fp32")
        convert_ct2(export_dir, work / "ct2-int8", quantization="int8")
    return run_all(args, export_dir, work)


def benchmark_hf(args, work: Path) -> list[dict]:
    """A Hugging Face Marian directory: imported for ours, as it is for HF, stock-converted for CTranslate2."""
    from transformer.import_hf import import_hf

    args.checkpoint = str(import_hf(args.hf, str(work / "imported.pt")))
    if not Path(args.src).exists():
        args.src, args.ref = builtin_test_files(work)
    if any(s.startswith("ct2") for s in args.systems):
        from ctranslate2.converters import TransformersConverter

        TransformersConverter(args.hf).convert(str(work / "ct2-fp32"), force=True)
        TransformersConverter(args.hf).convert(str(work / "ct2-int8"), quantization="int8", force=True)
    return run_all(args, args.hf, work)


def run_all(args, export_dir, work: Path) -> list[dict]:
    """Every (system, beam) in its own subprocess."""
    rows = []
    ours_env = allocator_env(os.environ, mimalloc_library())  # our commands' allocator (None: as this process)
    for beam in args.beam:
        for system in args.systems:
            cmd = (
                [
                    sys.executable,
                    __file__,
                    f"--run-one={system}:{beam}",
                    f"--checkpoint={args.checkpoint}",
                    f"--src={args.src}",
                    f"--ref={args.ref}",
                    f"--threads={args.threads}",
                    f"--limit={args.limit}",
                    f"--batch-tokens={args.batch_tokens}",
                    f"--export={export_dir}",
                    f"--ct2={work / 'ct2'}",
                    f"--max-len={args.max_len}",
                    f"--shortlist={args.shortlist}",
                ]
                + ([f"--hf={args.hf}"] if args.hf else [])
                + (["--profile"] if args.profile else [])
                + [f"--device={args.device}"]
            )
            env = ours_env if system.startswith("ours") else None
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                sys.exit(f"{system} beam {beam} failed:\n{done.stderr}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            split = (
                f"; per step {r['ms_per_step']:.2f} ms: matmul {r['matmul_ms']:.2f}, attention "
                f"{r['attention_ms']:.2f}, rest {r['rest_ms']:.2f}"
                if "ms_per_step" in r
                else ""
            )
            print(
                f"{system} beam {beam}: {r['sent_per_s']:.1f} sentences/s, BLEU {r['bleu']:.2f}{split}", file=sys.stderr
            )
    return rows


def per_class_argv(argv: list[str]) -> list[str]:
    """The command line without its --isa values (each class's child gets its own)."""
    out, skipping = [], False
    for arg in argv:
        if arg.startswith("--isa"):
            skipping = "=" not in arg
            continue
        if skipping and not arg.startswith("--"):
            continue
        skipping = False
        out.append(arg)
    return out


def parser() -> argparse.ArgumentParser:
    data = os.environ.get("MULTI30K_DIR", "../shared/data/multi30k")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", default=os.environ.get("TRANSFORMER_BENCH_CKPT", "runs/multi30k"), help="run directory or .pt"
    )
    parser.add_argument("--src", default=f"{data}/test2016.en.gz")
    parser.add_argument("--ref", default=f"{data}/test2016.de.gz")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="first N sentences (0: all)")
    parser.add_argument("--beam", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--batch-tokens", type=int, default=4096, help="source tokens per batch, for every system")
    parser.add_argument(
        "--train-tiny", action="store_true", help=f"without a checkpoint, train a small builtin model in {TINY_RUN}"
    )
    parser.add_argument(
        "--hf", help="a Hugging Face Marian model directory to import and benchmark (instead of --checkpoint)"
    )
    parser.add_argument(
        "--max-len",
        type=int,
        default=0,
        help="at most N tokens per sentence for every system (0: 1.5 * source + 10; "
        "a random model never ends a sentence, and HF's limit is per batch, not per sentence)",
    )
    parser.add_argument(
        "--make-opus-like", metavar="DIR", help="write a random MarianMTModel of opus-mt-en-de's shapes to DIR and exit"
    )
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: ours, HF and CTranslate2 all decode there")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="our rows: time per decoder step split into matmul, attention and the rest (slower; relative only)",
    )
    parser.add_argument(
        "--shortlist", default="", help="ours-shortlist rows: this shortlist (default: built from the training data)"
    )
    parser.add_argument(
        "--isa",
        nargs="+",
        default=[os.environ.get("BENCH_ISA", "native")],
        help="native and/or avx2: run as on an AVX2-only CPU (caps oneDNN, MKL, ATen); one table per class",
    )
    parser.add_argument("--run-one", help=argparse.SUPPRESS)  # internal: SYSTEM:BEAM in a subprocess
    parser.add_argument("--export", help=argparse.SUPPRESS)
    parser.add_argument("--ct2", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = parser().parse_args()
    if len(args.isa) > 1:  # one child per class, each printing its own table
        for isa in args.isa:
            subprocess.run([sys.executable, __file__, *per_class_argv(sys.argv[1:]), "--isa", isa], check=True)
        return
    emulate_isa(args.isa[0])
    if args.run_one:
        print(json.dumps(run_one(args)))
        return
    if args.make_opus_like:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from hf_models import write_marian

        # opus-mt-en-de: d_model 512, 6+6 layers, 8 heads, FFN 2048, 58,101 pieces
        write_marian(
            Path(args.make_opus_like),
            d_model=512,
            layers=6,
            heads=8,
            ffn=2048,
            vocab_size=58101,
            spm_size=4000,
            pairs=5000,
        )
        print(f"random OPUS-MT-shaped model: {args.make_opus_like}")
        return
    if not args.hf and not Path(args.checkpoint).exists() and not args.train_tiny:
        print(
            f"no trained checkpoint at {args.checkpoint}: train one (make multi30k), pass --checkpoint, or add --train-tiny",
            file=sys.stderr,
        )
        sys.exit(2)
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        rows = benchmark(args, Path(tmp))
    print(f"\n{rows[0]['sentences']} sentences from {args.src}; checkpoint {args.checkpoint}; {args.threads} threads")
    allocators = ", ".join(sorted({f"{r['system']} {r['allocator']}" for r in rows}))
    print(f"hardware: {class_line()}; allocators: {allocators}\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
