"""One optimizer update: forward and backward over update_freq batches, the token count and
losses summed over ranks, clipping, the learning rate of the schedule and the step."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from transformer.data.batching import Batch
from transformer.runtime import autocast
from transformer.train.distributed import all_sum
from transformer.train.loss import label_smoothed_loss, symmetric_kl
from transformer.train.optim import NO_ANCHOR, Anchor, lr_at, set_lr


def accumulate_gradients(
    net: nn.Module,
    batches: list[Batch],
    n_tokens: Tensor,
    *,
    label_smoothing: float,
    precision: str,
    scaler: torch.amp.GradScaler | None = None,
    world: int = 1,
    rdrop_alpha: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Forward and backward over the batches of one update, adding to ``.grad`` the gradient of
    (smoothed loss summed over every real target token) / ``n_tokens``, where ``n_tokens``
    counts the update's tokens on all ranks. DDP averages gradients over ranks, so each rank
    scales by ``world``: accumulation and data parallelism both equal one large batch.
    With ``rdrop_alpha`` each batch goes through the network twice in one forward (stacked,
    so dropout differs) and the loss per token is the mean of the two smoothed losses plus
    ``rdrop_alpha / 2`` times their symmetric KL (the R-Drop paper's loss, halved).
    Returns this rank's (smoothed loss sum, NLL sum)."""
    device = batches[0].src.device
    loss_sum = torch.zeros((), device=device)
    nll_sum = torch.zeros((), device=device)
    for j, b in enumerate(batches):
        defer_sync = world > 1 and j < len(batches) - 1  # DDP all-reduces once, after the last batch
        with net.no_sync() if defer_sync else contextlib.nullcontext():
            with autocast(device, precision):
                keep = b.tgt_out != b.pad_id  # (B, T)
                src, tgt_in, tgt_keep, target = b.src, b.tgt_in, keep, b.tgt_out[keep]
                if rdrop_alpha:  # the batch twice, stacked
                    src, tgt_in, tgt_keep, target = (torch.cat([t, t]) for t in (src, tgt_in, tgt_keep, target))
                logits = net(src, tgt_in, tgt_keep)  # (M, V), (2M, V) with R-Drop
                loss, nll = label_smoothed_loss(logits, target, label_smoothing)
                if rdrop_alpha:
                    loss = (loss + rdrop_alpha * symmetric_kl(*logits.chunk(2))) / 2
                    nll = nll / 2
            scaled = loss * world / n_tokens
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach()
        nll_sum += nll.detach()
    return loss_sum, nll_sum


def update(
    net: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batches: list[Batch],
    *,
    t: Any,
    precision: str,
    step: int,
    d_model: int,
    world: int,
    anchor: Anchor = NO_ANCHOR,
) -> dict:
    """Optimizer update number ``step`` over ``batches``; a non-finite loss or gradient skips
    it (fp16: the scaler decides). ``anchor``: where a revised schedule goes on from (optim.lr_at).
    Returns its statistics, ``finite`` among them."""
    net.train()
    device = batches[0].src.device
    n_tokens = torch.tensor(float(sum(b.n_tokens for b in batches)), device=device)
    all_sum(n_tokens, world=world)
    loss_sum, nll_sum = accumulate_gradients(
        net,
        batches,
        n_tokens,
        label_smoothing=t.label_smoothing,
        precision=precision,
        scaler=scaler,
        world=world,
        rdrop_alpha=t.rdrop_alpha,
    )
    all_sum(loss_sum, nll_sum, world=world)  # before the finiteness test, so every rank takes the same decision
    scaler.unscale_(optimizer)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm if t.clip_norm > 0 else float("inf"))
    finite = bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
    lr = lr_at(step, t, d_model, anchor)
    if finite or precision == "fp16":
        set_lr(optimizer, lr)
        scaler.step(optimizer)  # the scaler skips fp16 overflow steps itself
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return {
        "finite": finite,
        "loss": (loss_sum / n_tokens).item(),
        "nll": (nll_sum / n_tokens).item(),
        "grad_norm": grad_norm.item(),
        "lr": lr,
        "tokens": int(n_tokens.item()),
    }
