"""The CUDA path: the same properties the CPU tests prove, on a GPU. Skipped where there is
none (CI); run on a GPU machine with ``pytest tests/test_cuda.py`` (``scripts/cuda_check.sh``
runs it with the CUDA benchmarks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_decode import padded, random_sources, tiny_model
from test_train import assert_learns_with_fp32_weights, losses, tiny, torchrun

from transformer.config import DecodeConfig
from transformer.decode.search import beam_search, greedy_search
from transformer.decode.translator import ModelScorer, translate_ids
from transformer.runtime import autocast
from transformer.train import loop
from transformer.train.loss import label_smoothed_loss
from transformer.vocab import BOS, EOS, PAD

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


def test_cached_decoding_on_cuda_equals_full_forward() -> None:
    model = tiny_model().to(CUDA)
    src = padded(random_sources([7, 4, 9])).to(CUDA)
    prefix = torch.cat([torch.full((3, 1), BOS), torch.randint(EOS + 1, 24, (3, 8))], dim=1).to(CUDA)
    with torch.no_grad():
        full = F.log_softmax(model(src, prefix), dim=-1)
        scorer = ModelScorer(model, cached=True)
        state = scorer.start(src)
        for t in range(1, prefix.size(1) + 1):
            log_probs, state = scorer.step(state, prefix[:, :t])
            torch.testing.assert_close(log_probs, full[:, t - 1], atol=1e-4, rtol=0)


def test_beam_of_one_is_greedy_on_cuda() -> None:
    model = tiny_model().to(CUDA)
    sources = random_sources([5, 9, 3, 12, 7])
    greedy = translate_ids([model], sources, DecodeConfig(beam_size=1))
    with torch.inference_mode():
        beam = beam_search(ModelScorer(model), padded(sources).to(CUDA), beam_size=1, lp_style="gnmt", early_stop="fairseq", max_len_limit=63)
        plain = greedy_search(ModelScorer(model), padded(sources).to(CUDA), max_len_limit=63)
    assert [h[0].tokens for h in greedy] == [h[0].tokens for h in beam] == [h[0].tokens for h in plain]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank")
def test_ddp_on_nccl_equals_one_process_with_accumulation(tmp_path: Path) -> None:
    """As the gloo test in test_train.py: two ranks with batches b0, b1 train like one process
    with update_freq=2."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    torchrun(ddp, "trainer.schedule=constant", "trainer.max_steps=10", device="cuda")
    loop.train(tiny(single, "trainer.device=cuda", "trainer.schedule=constant", "trainer.update_freq=2", "trainer.max_steps=10",
                    "trainer.log_every=1", "trainer.eval_every=1000"))
    assert [l for _, _, l in losses(ddp)] == pytest.approx([l for _, _, l in losses(single)], rel=1e-3)
