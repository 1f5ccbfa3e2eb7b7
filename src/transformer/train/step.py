"""One optimizer update: forward and backward over update_freq batches, the token count and
losses summed over ranks, clipping, the learning rate of the schedule and the step."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from transformer.config import TrainerConfig
from transformer.data.batching import Batch
from transformer.errors import UserError
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
                src, tgt_in, positions, target = b.src, b.tgt_in, b.positions, b.target
                if rdrop_alpha:  # the batch twice, stacked
                    src, tgt_in, target = (torch.cat([t, t]) for t in (src, tgt_in, target))
                    positions = torch.cat([positions, positions + b.tgt_in.numel()])
                for x in (src, tgt_in, positions):  # trainer.compile: rows vary from batch to batch (build.compiled)
                    torch._dynamo.maybe_mark_dynamic(x, 0)
                logits = net(src, tgt_in, positions)  # (M, V), (2M, V) with R-Drop
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
    t: TrainerConfig,
    precision: str,
    step: int,
    d_model: int,
    world: int,
    anchor: Anchor = NO_ANCHOR,
    deferred: bool = False,
) -> dict:
    """Optimizer update number ``step`` over ``batches``; a non-finite loss or gradient skips
    it (fp16: the scaler decides). ``anchor``: where a revised schedule goes on from (optim.lr_at).
    Returns its statistics, ``finite`` among them, as Python numbers, or with ``deferred``
    (trainer.deferred_metrics) as tensors on the device: the host never waits for the GPU, and
    the fused AdamW skips a non-finite update itself."""
    net.train()
    device = batches[0].src.device
    n_tokens = torch.full((), float(sum(b.n_tokens for b in batches)), device=device)  # no host-to-device copy
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
    finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
    lr = lr_at(step, t, d_model, anchor)
    if deferred and not scaler.is_enabled():
        set_lr(optimizer, lr)
        optimizer.found_inf = (~finite).float()  # read by the fused kernel: a non-finite update changes nothing
        optimizer.step()
    elif scaler.is_enabled() or bool(finite):
        set_lr(optimizer, lr)
        scaler.step(optimizer)  # the scaler skips fp16 overflow steps itself
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    stats = {"finite": finite, "loss": loss_sum / n_tokens, "nll": nll_sum / n_tokens, "grad_norm": grad_norm}
    stats |= {"lr": lr, "tokens": n_tokens}
    return stats if deferred else host_stats(stats)


def host_stats(stats: dict) -> dict:
    """``update``'s statistics as Python numbers (reading a tensor waits for the GPU)."""
    out = {k: v.item() if isinstance(v, Tensor) else v for k, v in stats.items()}
    return out | {"tokens": int(out["tokens"])}


def check_deferrable(optimizer: torch.optim.Optimizer) -> None:
    """Deferred metrics rely on the fused AdamW's on-device skip of non-finite updates."""
    if not optimizer.defaults.get("fused"):
        raise UserError("trainer.deferred_metrics=true needs the fused AdamW (fp32 weights on CPU or CUDA)")


class Tally:
    """Non-finite updates between two log lines, counted on the device (deferred metrics):
    how many, and the longest run of them in a row (trainer.max_bad_steps)."""

    def __init__(self, device: torch.device):
        self.skipped, self.in_a_row, self.worst = (torch.zeros((), dtype=torch.int64, device=device) for _ in range(3))

    def add(self, finite: Tensor) -> None:
        bad = (~finite).long()
        self.skipped += bad
        self.in_a_row.mul_(bad).add_(bad)  # (run + 1) if bad else 0
        torch.maximum(self.worst, self.in_a_row, out=self.worst)

    def read(self) -> tuple[int, int]:
        """(skipped, longest run) since the last read, as Python numbers; a run in progress
        carries over into the next count."""
        skipped, worst = int(self.skipped), int(self.worst)
        self.skipped.zero_()
        self.worst.copy_(self.in_a_row)
        return skipped, worst
