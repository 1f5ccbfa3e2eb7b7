"""The blocked label-smoothed loss equals PyTorch's cross-entropy in value and gradient; the
R-Drop term equals the mean of the two KL divergences."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from transformer.train.loss import label_smoothed_loss, symmetric_kl


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_and_gradient_equal_cross_entropy(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, smoothing: float
) -> None:
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
    torch.testing.assert_close(
        ours.float(), logits.grad.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=1e-2
    )


def test_empty_batch_gives_zero() -> None:
    loss, nll = label_smoothed_loss(torch.zeros(0, 5, requires_grad=True), torch.zeros(0, dtype=torch.long), 0.1)
    assert loss.item() == nll.item() == 0.0


def test_symmetric_kl_is_the_mean_of_both_divergences() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 30, generator=g).mul(2).requires_grad_()
    b = torch.randn(20, 30, generator=g).mul(2).requires_grad_()
    ours = symmetric_kl(a, b)
    ours.backward()
    grads = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    ref = 0.5 * (
        F.kl_div(lb, la, log_target=True, reduction="sum") + F.kl_div(la, lb, log_target=True, reduction="sum")
    )
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grads, (a.grad, b.grad))
    assert symmetric_kl(a, a).item() == pytest.approx(0.0, abs=1e-6)
