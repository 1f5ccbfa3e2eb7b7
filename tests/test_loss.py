"""The blocked label-smoothed loss equals PyTorch's cross-entropy in value and gradient."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from transformer.train.loss import label_smoothed_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_and_gradient_equal_cross_entropy(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, smoothing: float) -> None:
    monkeypatch.setattr(sys.modules["transformer.train.loss"], "BLOCK", 7 * 30)  # 7 rows per block, 50 rows
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 30, generator=g).mul(3).to(dtype).requires_grad_()
    target = torch.randint(0, 30, (50,), generator=g)
    loss, nll = label_smoothed_loss(logits, target, smoothing)
    (2 * loss).backward()
    ours = logits.grad
    logits.grad = None
    ref = F.cross_entropy(logits.float(), target, label_smoothing=smoothing, reduction="sum")
    (2 * ref).backward()
    assert loss.dtype == nll.dtype == torch.float32 and not nll.requires_grad
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(nll, F.cross_entropy(logits.detach().float(), target, reduction="sum"))
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.float(), logits.grad.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=1e-2)


def test_empty_batch_gives_zero() -> None:
    loss, nll = label_smoothed_loss(torch.zeros(0, 5, requires_grad=True), torch.zeros(0, dtype=torch.long), 0.1)
    assert loss.item() == nll.item() == 0.0
