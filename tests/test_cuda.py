"""The CUDA path: the same properties the CPU tests prove, on a GPU. Skipped where there is
none (CI); run on a GPU machine with ``pytest tests/test_cuda.py tests/decode/test_decode.py``
(``scripts/gpu_check.sh`` runs them with the GPU benchmarks). Cached decoding and beam 1 =
greedy run on CUDA as a ``device`` parameter of their tests in test_decode.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny import padded, random_sources, tiny_model
from training import assert_learns_with_fp32_weights, losses, tiny, torchrun
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


# the paths that keep a GPU busy (tests/test_gpu_paths.py proves them on the CPU) ---------------


def test_masked_and_causal_attention_run_on_the_fused_kernels() -> None:
    """Key padding (a boolean mask) runs on the memory-efficient kernel, causal self-attention
    (is_causal, no mask) on flash: with only those backends allowed nothing falls back to math."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from transformer.model.transformer import padding_mask

    q, k, v = (torch.randn(2, 8, 16, 64, device=CUDA, dtype=torch.bfloat16) for _ in range(3))
    mask = padding_mask(torch.tensor([[5] * 16, [5] * 9 + [PAD] * 7], device=CUDA))
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        masked = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.isfinite(masked).all() and torch.isfinite(causal).all()


def test_deferred_metrics_on_cuda_log_what_per_step_reading_logs(tmp_path: Path) -> None:
    """On CUDA (where trainer.deferred_metrics=auto turns them on) the records equal the per-step
    reading's, up to the GPU's nondeterministic gradient sums."""
    from test_gpu_paths import RUN, comparable

    plain, deferred = tmp_path / "plain", tmp_path / "deferred"
    loop.train(tiny(plain, *RUN, "trainer.device=cuda", "trainer.deferred_metrics=false"))
    loop.train(tiny(deferred, *RUN, "trainer.device=cuda"))
    a, b = comparable(plain), comparable(deferred)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)


def test_compiled_bf16_training_on_cuda_learns(tmp_path: Path) -> None:
    """trainer.compile (inductor) with length buckets in bf16 on the GPU: the loss falls and the
    weights stay fp32."""
    assert_learns_with_fp32_weights(
        tmp_path,
        "trainer.device=cuda",
        "trainer.precision=bf16",
        "trainer.compile=true",
        "data.length_buckets=[64]",
    )
