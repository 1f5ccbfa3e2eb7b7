"""Optimizer and learning-rate schedules; ``lr_at`` is a pure function of the step."""

from __future__ import annotations

import math

import torch
from torch import nn

from transformer.config import TrainerConfig

Anchor = tuple[int, float]  # (step s, progress p): the schedule's phase had reached p at step s
NO_ANCHOR: Anchor = (0, 0.0)


def lr_at(step: int, cfg: TrainerConfig, d_model: int, anchor: Anchor = NO_ANCHOR) -> float:
    """Learning rate for optimizer update ``step`` (1-based).

    inverse_sqrt: linear warmup to ``lr``, then lr * sqrt(warmup / step) (fairseq).
    cosine: linear warmup, then cosine decay to ``min_lr`` at ``max_steps``.
    noam: the paper's d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), scaled by ``lr``.
    constant: linear warmup, then ``lr``.

    ``anchor``: a schedule revised at step s (the time budget's plan, budget.revise) goes on
    from where it stood: the phase step s was in (warmup or decay) had reached progress p, and
    the rest of that phase is spread over the steps left to its new end, so the rate has no jump.
    """
    step = max(step, 1)
    warmup = max(cfg.warmup_steps, 1)
    if cfg.schedule == "noam":
        return cfg.lr * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
    if step < warmup:
        return cfg.lr * phase_progress(step, 0, warmup, anchor)
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * math.sqrt(warmup / step)
    if cfg.schedule == "cosine":
        progress = phase_progress(step, warmup, cfg.max_steps, anchor)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    return cfg.lr  # constant


def phase_progress(step: int, begin: int, end: int, anchor: Anchor) -> float:
    """How far ``step`` is through the phase from ``begin`` to ``end`` (0 to 1), going on
    linearly from the anchor when the anchor lies in this phase."""
    start, reached = anchor if begin <= anchor[0] < end else (begin, 0.0)
    return min(1.0, reached + (1 - reached) * (step - start) / max(1, end - start))


def phase_anchor(step: int, cfg: TrainerConfig, anchor: Anchor = NO_ANCHOR) -> float:
    """The progress ``step`` has reached in its phase (warmup or decay) under ``cfg`` and ``anchor``:
    the anchor of a schedule revised at ``step``."""
    warmup = max(cfg.warmup_steps, 1)
    if step < warmup:
        return phase_progress(step, 0, warmup, anchor)
    return phase_progress(step, warmup, cfg.max_steps, anchor)


def build_optimizer(model: nn.Module, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """Adam(W) over the unique parameters; no weight decay on biases, norms and embeddings.
    The fused kernel (also Hugging Face Trainer's default) when the parameters allow it:
    one pass per tensor instead of a dozen elementwise ops, ~4% of a CPU step."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in model.parameters())
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
