"""An exponential moving average of the weights (trainer.ema_decay): an fp32 copy moved
towards the trained weights after every optimizer step, validated and decoded in their stead.

In checkpoints (state.training_checkpoint) "model" holds the average, so decode, evaluate,
averaging, export and trainer.init_from use it unchanged, and "train_model" the trained
weights, which a resumed run continues from; both are restored exactly."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


class EMA:
    """ema = decay * ema + (1 - decay) * weights over every floating-point tensor of
    ``model.state_dict()``, starting from the weights at construction."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        live = model.state_dict(keep_vars=True)
        self.live = {k: v for k, v in live.items() if v.is_floating_point()}
        self.average = {k: v.detach().float().clone() for k, v in self.live.items()}

    @torch.no_grad()
    def update(self) -> None:
        for k, v in self.live.items():
            self.average[k].mul_(self.decay).add_(v.detach().float(), alpha=1 - self.decay)

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """``model``'s state dict with the averages in place of its weights (in their dtype)."""
        return {k: self.average[k].to(v.dtype) if k in self.average else v for k, v in model.state_dict().items()}

    def load(self, weights: dict[str, Tensor]) -> None:
        """Averages from a checkpoint's "model" (written by ``state_dict``)."""
        for k, v in self.average.items():
            v.copy_(weights[k])


@contextlib.contextmanager
def averaged(model: nn.Module, ema: EMA | None) -> Iterator[None]:
    """``model`` holds ``ema``'s averages inside (validation), its own weights again after;
    without an EMA, nothing changes."""
    if ema is None:
        yield
        return
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(ema.state_dict(model))
    try:
        yield
    finally:
        model.load_state_dict(own)
