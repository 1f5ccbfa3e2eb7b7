"""What a run trains with: processes, device and precision, the model as the loop calls it
(DDP-wrapped, compiled, its linear layers on the faster CPU kernel), optimizer and scaler.
Every setting that can be wrong is checked here, before any data loads."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from transformer.allocator import active_allocator, keep_freed_memory
from transformer.config import ModelConfig, Switch, TrainConfig, validate
from transformer.data.sources import source_for
from transformer.data.tokenizer import Tokenizer
from transformer.decode.spec import check_decode_config
from transformer.errors import UserError
from transformer.hardware import resolve_precision
from transformer.model import Transformer, build_model
from transformer.model.kernels import onednn_shapes
from transformer.model.onednn_linear import train_linears_on_onednn
from transformer.runtime import autocast
from transformer.train.distributed import Dist, setup_distributed, share
from transformer.train.init import load_init_weights
from transformer.train.optim import build_optimizer
from transformer.train.step import check_deferrable


@dataclass
class Runtime:
    dist: Dist
    device: torch.device
    precision: str  # fp32 | bf16 | fp16, ``auto`` resolved
    onednn: Switch  # trainer.onednn_linear
    deferred: bool  # trainer.deferred_metrics, auto resolved
    run_dir: str  # rank 0's (Hydra names run directories by the clock)


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Processes, device, precision, threads and the run directory (rank 0's)."""
    t = cfg.trainer
    validate(cfg)  # every range (the enumerated keys: by their types), before anything runs
    source_for(cfg.data)  # data.source is a registered name, each data.corpora entry too
    buckets = list(cfg.data.length_buckets)
    if buckets and (buckets != sorted(set(buckets)) or buckets[0] < 1):
        raise UserError(f"data.length_buckets={buckets}: expected increasing positive lengths, e.g. [32, 64, 128]")
    if t.threads > 0:  # first: the hardware description logged later counts the threads in use
        torch.set_num_threads(t.threads)
    dist, device = setup_distributed(t.device)
    rt = Runtime(
        dist,
        device,
        resolve_precision(t.precision, device, "trainer.precision"),
        t.onednn_linear,
        {Switch.auto: device.type == "cuda", Switch.true: True, Switch.false: False}[t.deferred_metrics],
        share(cfg.run_dir, dist),
    )
    autocast(device, rt.precision)  # fp16 on a CPU fails now, not after data loading
    check_decode_config(cfg.decode)
    if not dist.main:
        logging.getLogger("transformer").setLevel(logging.WARNING)  # one rank tells the story
    if t.keep_freed_memory and device.type == "cpu" and active_allocator() == "system":
        keep_freed_memory()
    return rt


def compiled(net: nn.Module, buckets: list[int]) -> nn.Module:
    """``torch.compile``d ``net`` for token-budget batches, whose rows and lengths change from
    batch to batch. The row count is a dynamic size from the first batch (step.py marks it);
    the lengths are too without ``buckets``: one graph, and one more for a single-row batch.
    With data.length_buckets each bucket's length is static: a graph per bucket (two with a
    single-row batch), specialised to its shape."""
    if not buckets:
        return torch.compile(net, dynamic=True)
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 2 * len(buckets) + 2)  # else dynamo falls back to eager
    return torch.compile(net, dynamic=False)


def setup_model(
    cfg: TrainConfig, tokenizer: Tokenizer, rt: Runtime, init: tuple[Path, dict] | None = None
) -> tuple[ModelConfig, Transformer, nn.Module, torch.optim.Optimizer, torch.amp.GradScaler]:
    """(model config, model, what the loop calls, optimizer, scaler); the same initial weights
    on every rank: random, or trainer.init_from's (``init``)."""
    t = cfg.trainer
    model_cfg = replace(cfg.model, src_vocab_size=tokenizer.src_vocab_size, tgt_vocab_size=tokenizer.tgt_vocab_size)
    torch.manual_seed(t.seed)
    model = build_model(model_cfg).to(rt.device)
    if init is not None:
        load_init_weights(model, init)
    if rt.onednn != "false" and rt.device.type == "cpu" and rt.precision == "fp32" and not t.compile:
        shapes = None if rt.onednn == "true" else onednn_shapes(model, rows=512, training=True)
        train_linears_on_onednn(model, shapes)  # acts on fp32 CPU calls only
    net: nn.Module = model  # maybe DDP-wrapped, maybe compiled
    if rt.dist.world > 1:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )
    if t.compile:
        net = compiled(net, cfg.data.length_buckets)  # checkpoints keep the plain model's state dict
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "fp16")
    optimizer = build_optimizer(model, t)
    if rt.deferred:
        check_deferrable(optimizer)
    return model_cfg, model, net, optimizer, scaler
