"""Label-smoothed cross-entropy summed over real (non-padding) target tokens."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def label_smoothed_loss(logits: Tensor, target: Tensor, smoothing: float) -> tuple[Tensor, Tensor]:
    """logits (M, V) for the M real target tokens, target (M,) -> (smoothed loss sum, NLL sum),
    both in fp32. The smoothing mass is spread uniformly over the vocabulary."""
    log_probs = F.log_softmax(logits.float(), dim=-1)  # (M, V)
    nll = -log_probs.gather(-1, target[:, None]).squeeze(-1)  # (M,)
    if smoothing == 0:
        return nll.sum(), nll.sum()
    smooth = -log_probs.mean(dim=-1)  # (M,)
    loss = (1.0 - smoothing) * nll + smoothing * smooth
    return loss.sum(), nll.sum()
