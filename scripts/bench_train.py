"""Training-step speed: our Transformer against Hugging Face MarianMTModel of the same shapes.

Both train on the same Multi30k batches (our BPE, our token-budget batching), or with
--synthetic on WMT-length batches of random ids (20-60 subwords a side, --vocab pieces),
with the same optimizer (fused AdamW, HF Trainer's default), label smoothing and clipping.
Ours is set up by the trainer's own code (train/build.py: --compile as trainer.compile,
--buckets as data.length_buckets) and runs its update (train/step.py: on CUDA with deferred
metrics, so the host never waits for the GPU). Steps are timed together, one
synchronisation before and after; each
configuration runs in its own subprocess so peak memory is its own. On CPU, ours runs with
the allocator setting our trainer applies (``allocator.keep_freed_memory``) and, in fp32, its
oneDNN linear layers where they time faster (``trainer.onednn_linear=auto``; --mkl: without); HF as it ships, or with
the same allocator setting under --same-allocator. Prints a markdown table: target tokens/s,
ms/step, peak RSS (CPU) or peak allocated memory (CUDA), and MFU against a matmul peak
measured in the same run.

    python scripts/bench_train.py                      # small model, fp32 + bf16, ours vs HF
    python scripts/bench_train.py --model base --device cuda --precision bf16
    python scripts/bench_train.py --model base --device cuda --precision bf16 --synthetic --vocab 32000 --max-tokens 25000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from transformer.allocator import keep_freed_memory
from transformer.config import DataConfig, ModelConfig, TrainConfig, TrainerConfig, config_dir
from transformer.data.batching import Example, collate, encode_examples, token_batches
from transformer.data.sources import load_split
from transformer.data.tokenizer import Tokenizer, build_tokenizer
from transformer.errors import UserError
from transformer.hardware import class_line, emulate_isa
from transformer.model.kernels import linear_on_packed, pack_weight
from transformer.runtime import autocast
from transformer.train.build import Runtime, setup_model
from transformer.train.distributed import Dist
from transformer.train.step import update
from transformer.vocab import BOS, EOS, PAD

# dense bf16/fp16 tensor-core peaks from the datasheets (SXM parts), for MFU beside the measured matmul peak
DATASHEET_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def model_config(name: str, vocab: int) -> ModelConfig:
    """Shapes from configs/model/<name>.yaml, with the vocabulary size filled in."""
    cfg = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(Path(config_dir()) / "model" / f"{name}.yaml")
    )
    cfg = OmegaConf.to_object(cfg)
    cfg.src_vocab_size = cfg.tgt_vocab_size = vocab
    return cfg


def synthetic_batches(args) -> tuple[list, int]:
    """--steps + --warmup token-budget batches of WMT-length pairs of random ids: source and
    target 20-60 subwords each (EOS, BOS added) over a --vocab vocabulary."""
    rng = np.random.default_rng(1)
    n = (args.steps + args.warmup + 2) * args.max_tokens // 20
    lengths = rng.integers(20, 61, size=(n, 2))
    ids = rng.integers(4, args.vocab, size=(n, 2, 60)).tolist()
    examples = [Example(s[:a] + [EOS], [BOS] + t[:b] + [EOS]) for (s, t), (a, b) in zip(ids, lengths.tolist())]
    buckets = args.buckets or ()
    order = token_batches(lengths + 1, args.max_tokens, seed=1, epoch=0, buckets=buckets)[: args.steps + args.warmup]
    return [collate([examples[i] for i in b], buckets=buckets) for b in order], args.vocab


def load_batches(args) -> tuple[list, int]:
    """The first --steps + --warmup batches of epoch 0, and the vocabulary size."""
    if args.synthetic:
        return synthetic_batches(args)
    root = os.environ.get("MULTI30K_DIR", args.data)
    data = DataConfig(name="multi30k", source="files", train_src=f"{root}/train.en.gz", train_tgt=f"{root}/train.de.gz")
    pairs = load_split(data, "train")
    spm_path = Path(args.cache) / "spm.model"
    if spm_path.exists():
        tok = Tokenizer(spm_path.read_bytes())
    else:
        tok = build_tokenizer(pairs, args.vocab, True, 2_000_000)
        tok.save(Path(args.cache))
    examples = encode_examples(*tok.encode_pairs(pairs), 128, "bench")
    lengths = [(len(e.src), len(e.tgt) - 1) for e in examples]
    order = token_batches(lengths, args.max_tokens, seed=1, epoch=0, buckets=args.buckets or ())[
        : args.steps + args.warmup
    ]
    return [collate([examples[i] for i in b], buckets=args.buckets or ()) for b in order], tok.src_vocab_size


def hf_marian(cfg: ModelConfig):
    """MarianMTModel with our shapes (the exporter's config: post-norm, sinusoids, tied scaled embeddings)."""
    from transformers import MarianMTModel

    from transformer.export import hf_config
    from transformer.hf_layout import MARIAN

    return MarianMTModel(hf_config(cfg, MARIAN))


def matmul_peak(device: torch.device, dtype: torch.dtype, reps: int = 10) -> float:
    """FLOP/s of a square matmul, the faster of PyTorch's own and (fp32 on CPU) oneDNN's on a
    packed weight: the ceiling MFU is measured against. 2048 saturates 2 CPU cores; a GPU
    needs 8192 to reach its datasheet-class rate."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    kernels = [lambda: a @ b]
    if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        packed = pack_weight(b)
        kernels.append(lambda: linear_on_packed(a, packed, None))
    best = 0.0
    for kernel in kernels:
        for _ in range(3):
            kernel()
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            kernel()
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_flops(cfg: ModelConfig, batch) -> float:
    """Matmul FLOPs of one training step (3x forward) on the batch's real tokens."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.tgt_vocab_size
    src_tokens = int((batch.src != PAD).sum())
    tgt_tokens = batch.n_tokens
    s_len, t_len = batch.src.size(1), batch.tgt_in.size(1)
    enc = cfg.n_encoder_layers * src_tokens * (2 * 4 * d * d + 2 * 2 * d * f + 2 * 2 * s_len * d)
    dec = (
        cfg.n_decoder_layers
        * tgt_tokens
        * (2 * 4 * d * d + 2 * 4 * d * d + 2 * 2 * d * f + 2 * 2 * (t_len / 2 + s_len) * d)
    )
    dec += cfg.n_decoder_layers * src_tokens * 2 * 2 * d * d  # cross-attention K/V of the source
    out = tgt_tokens * 2 * d * v
    return 3.0 * (enc + dec + out)


class VocabSizes(NamedTuple):
    """What train.build.setup_model reads from a tokenizer (synthetic batches have none)."""

    src_vocab_size: int
    tgt_vocab_size: int


def ours_step(args, cfg: ModelConfig, device: torch.device):
    """(model, step) as our trainer sets them up (train/build.py: oneDNN linear layers where
    faster in fp32 on CPU, --mkl: without; --compile and --buckets as trainer.compile and
    data.length_buckets; fused AdamW) and its update (train/step.py) on one batch: clipping at
    1.0, label smoothing 0.1, deferred metrics on CUDA."""
    t = TrainerConfig(lr=1e-4, schedule="constant", warmup_steps=1, clip_norm=1.0, label_smoothing=0.1, seed=0)
    t.compile, t.onednn_linear = args.compile, "false" if args.mkl else "auto"
    run_cfg = TrainConfig(model=cfg, data=DataConfig(length_buckets=list(args.buckets or ())), trainer=t)
    rt = Runtime(Dist(), device, args.precision, t.onednn_linear, deferred=device.type == "cuda")  # deferred: auto
    _, model, net, optimizer, scaler = setup_model(run_cfg, VocabSizes(cfg.src_vocab_size, cfg.tgt_vocab_size), rt)

    def run(b, i: int) -> None:
        update(
            net,
            model,
            optimizer,
            scaler,
            [b],
            t=t,
            precision=args.precision,
            step=i + 1,
            d_model=cfg.d_model,
            world=1,
            deferred=rt.deferred,
        )

    return model, run


def hf_step(args, model, device: torch.device):
    """One training step of MarianMTModel as a Hugging Face user writes it: cross-entropy with
    label smoothing on fp32 logits, clipping, fused AdamW (HF Trainer's default)."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.0, fused=True
    )
    net = torch.compile(model, dynamic=True) if args.compile else model

    def run(b, i: int) -> None:
        with autocast(device, args.precision):
            logits = net(input_ids=b.src, attention_mask=(b.src != PAD).long(), decoder_input_ids=b.tgt_in).logits
            loss = F.cross_entropy(
                logits.float().flatten(0, 1),
                b.tgt_out.flatten(),
                ignore_index=PAD,
                label_smoothing=0.1,
                reduction="sum",
            )
        (loss / b.n_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def run_one(args) -> dict:
    """Time one (implementation, precision) configuration in this process: --warmup steps,
    then --steps steps timed together (the GPU's queue drained before and after)."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu" and (args.impl == "ours" or args.same_allocator):
        keep_freed_memory()  # what our trainer does on CPU (trainer.keep_freed_memory)
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)  # what ours does inside attention (model/attention.py)
    batches, vocab = load_batches(args)
    cfg = model_config(args.model, vocab)
    if args.impl == "ours":
        model, run = ours_step(args, cfg, device)
    else:
        model = hf_marian(cfg).to(device).train()
        run = hf_step(args, model, device)
    on_device = [b.to(device) for b in batches]
    for i, b in enumerate(on_device[: args.warmup]):
        run(b, i)
    sync(device)
    start = time.perf_counter()
    for i, b in enumerate(on_device[args.warmup :], args.warmup):
        run(b, i)
    sync(device)
    total = time.perf_counter() - start
    timed = batches[args.warmup :]
    return measures(args, device, model, cfg, timed, total)


def measures(args, device: torch.device, model, cfg: ModelConfig, timed: list, total: float) -> dict:
    """The row of one configuration: speed, memory, FLOP rate and MFU against the measured
    matmul peak and (on a known GPU) the datasheet's."""
    tokens, flops = sum(b.n_tokens for b in timed), sum(train_flops(cfg, b) for b in timed)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float16 if args.precision == "fp16" else torch.float32
    peak = matmul_peak(device, dtype)
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device) / 2**20
        name = torch.cuda.get_device_name(device)
        sheet = next((v for k, v in DATASHEET_TFLOPS.items() if k in name), 0.0) if dtype != torch.float32 else 0.0
    else:
        memory, sheet = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0.0
    return {
        "impl": args.impl + ("+compile" if args.compile else ""),
        "precision": args.precision,
        "tokens_per_s": tokens / total,
        "ms_per_step": 1000 * total / len(timed),
        "peak_mem_mb": memory,
        "tflops": flops / total / 1e12,
        "mfu": flops / total / peak,
        "peak_tflops": peak / 1e12,
        "mfu_datasheet": flops / total / (sheet * 1e12) if sheet else None,
        "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
    }


def print_table(args: argparse.Namespace, results: list[dict]) -> None:
    """The run's settings and hardware, then one row per (implementation, precision)."""
    hf = {r["precision"]: r for r in results if r["impl"] == "hf"}
    print(
        f"\nmodel={args.model} device={args.device} threads={args.threads or torch.get_num_threads()} "
        f"max_tokens={args.max_tokens} steps={args.steps} synthetic={args.synthetic} buckets={args.buckets} "
        f"same_allocator={args.same_allocator} mkl={args.mkl} compile={args.compile} "
        f"no_cudnn_attention={args.no_cudnn_attention} torch={torch.__version__}"
        + (f" gpu={torch.cuda.get_device_name()}" if args.device.startswith("cuda") else "")
    )
    print(f"hardware: {class_line()}\n")
    print(
        "| impl | precision | tokens/s | ms/step | peak mem MB | TFLOP/s | MFU (measured peak) | MFU (datasheet) | vs HF |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        peer = hf.get(r["precision"])
        ratio = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if peer else "-"
        sheet = f"{100 * r['mfu_datasheet']:.1f}%" if r["mfu_datasheet"] else "-"
        print(
            f"| {r['impl']} | {r['precision']} | {r['tokens_per_s']:.0f} | {r['ms_per_step']:.0f} | {r['peak_mem_mb']:.0f} | "
            f"{r['tflops']:.3f} | {100 * r['mfu']:.1f}% | {sheet} | {ratio} |"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="a config name under configs/model")
    parser.add_argument("--data", default="../shared/data/multi30k", help="Multi30k folder (or env MULTI30K_DIR)")
    parser.add_argument(
        "--synthetic", action="store_true", help="WMT-length random ids (20-60 a side) instead of Multi30k"
    )
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--buckets", type=int, nargs="*", help="pad lengths as data.length_buckets does")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--impl", nargs="+", default=["ours", "hf"], help="ours and/or hf")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache", default="runs/bench", help="where the benchmark's BPE model is kept")
    parser.add_argument(
        "--same-allocator",
        action="store_true",
        help="give HF our trainer's CPU allocator setting too (glibc keeps freed memory)",
    )
    parser.add_argument(
        "--mkl", action="store_true", help="ours in fp32 on CPU with plain nn.Linear (trainer.onednn_linear=false)"
    )
    parser.add_argument(
        "--no-cudnn-attention",
        action="store_true",
        help="CUDA: give HF our attention backends too (no cuDNN attention, which plans per shape)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile both models (give --warmup room for recompiles)"
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--isa",
        default=os.environ.get("BENCH_ISA", "native"),
        help="native, or avx2: run as on an AVX2-only CPU (caps oneDNN, MKL, ATen)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def child_command(args: argparse.Namespace, impl: str, precision: str) -> list[str]:
    """This script, timing one (implementation, precision) in a fresh process."""
    values = {
        "impl": impl,
        "precision": precision,
        "model": args.model,
        "data": args.data,
        "vocab": args.vocab,
        "max-tokens": args.max_tokens,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "device": args.device,
        "cache": args.cache,
    }
    cmd = [sys.executable, __file__, "--child"] + [f"--{k}={v}" for k, v in values.items()]
    switches = ("synthetic", "same_allocator", "mkl", "compile", "no_cudnn_attention")
    cmd += [f"--{name.replace('_', '-')}" for name in switches if getattr(args, name)]
    return cmd + (["--buckets", *map(str, args.buckets)] if args.buckets else [])


def main() -> None:
    args = parse_args()
    emulate_isa(args.isa)
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    if args.child:
        args.impl, args.precision = args.impl[0], args.precision[0]
        print(json.dumps(run_one(args)))
        return
    try:
        load_batches(args)  # train the shared BPE once, before the timed children
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    results = []
    for precision in args.precision:
        for impl in args.impl:
            out = subprocess.run(child_command(args, impl, precision), capture_output=True, text=True)
            if out.returncode != 0:
                last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""
                print(f"{impl} {precision}: failed\n{last}", file=sys.stderr)
                continue
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print_table(args, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
