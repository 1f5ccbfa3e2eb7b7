"""The CUDA path: the same properties the CPU tests prove, on a GPU. Skipped where there is
none (CI); run on a GPU machine with ``pytest tests/test_cuda.py tests/test_decode.py``
(``scripts/cuda_check.sh`` runs them with the CUDA benchmarks). Cached decoding and beam 1 =
greedy run on CUDA as a ``device`` parameter of their tests in test_decode.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_decode import padded, random_sources, tiny_model
from test_train import assert_learns_with_fp32_weights, losses, tiny, torchrun
from transformer.runtime import autocast
from transformer.train import loop
from transformer.train.loss import label_smoothed_loss
from transformer.vocab import BOS, PAD

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_on_cuda_learns_and_keeps_fp32_weights(tmp_path: Path, precision: str) -> None:
    assert_learns_with_fp32_weights(tmp_path, "trainer.device=cuda", f"trainer.precision={precision}")


def step_gradients(device: torch.device, precision: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of one label-smoothed step of a fixed model on a fixed padded batch."""
    model = tiny_model(vocab=50).train().to(device)
    src = padded(random_sources([9, 4, 12, 7], vocab=50)).to(device)
    tgt = padded([[BOS] + s for s in random_sources([6, 11, 3, 8], vocab=50, seed=2)]).to(device)
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
    keep = tgt_out != PAD
    with autocast(device, precision):
        loss, _ = label_smoothed_loss(model(src, tgt_in, keep), tgt_out[keep], 0.1)
    loss.backward()
    return loss.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("bf16", 1e-1)])
def test_cuda_step_equals_cpu_step(precision: str, tol: float) -> None:
    """Padding masks, SDPA kernels and the fused loss give the CPU's loss and gradients."""
    cpu_loss, cpu_grads = step_gradients(torch.device("cpu"), "fp32")
    loss, grads = step_gradients(CUDA, precision)
    torch.testing.assert_close(loss, cpu_loss, rtol=tol, atol=tol)
    for name, g in cpu_grads.items():
        assert (grads[name] - g).norm() <= tol * g.norm() + 1e-6, name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank")
def test_ddp_on_nccl_equals_one_process_with_accumulation(tmp_path: Path) -> None:
    """As the gloo test in test_train.py: two ranks with batches b0, b1 train like one process
    with update_freq=2."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    torchrun(ddp, "trainer.schedule=constant", "trainer.max_steps=10", device="cuda")
    loop.train(
        tiny(
            single,
            "trainer.device=cuda",
            "trainer.schedule=constant",
            "trainer.update_freq=2",
            "trainer.max_steps=10",
            "trainer.log_every=1",
            "trainer.eval_every=1000",
        )
    )
    assert [loss for _, _, loss in losses(ddp)] == pytest.approx([loss for _, _, loss in losses(single)], rel=1e-3)
