"""The paths that keep a GPU busy, proven on the CPU against the plain ones: SDPA attention
with boolean masks against the spelled-out softmax, host-found loss positions against a
boolean mask, bucketed padding against none, deferred metrics against per-step reading
(same records, same weights, non-finite updates still skipped and stopped), and
torch.compile building a bounded number of graphs over batches of changing shapes."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from training import losses, poison_losses, tiny, toy_examples, toy_model, train_records, weights
from transformer.checkpoint import load_checkpoint
from transformer.data.batching import collate, token_batches
from transformer.errors import UserError
from transformer.model.attention import CrossAttention, SelfAttention, attention_weights, merge_heads, split_heads
from transformer.model.transformer import padding_mask
from transformer.runtime import autocast
from transformer.train import build, loop, step
from transformer.vocab import PAD

CPU = torch.device("cpu")
COMPILE = torch.compile  # the real one, patched with a counting backend below


# attention ------------------------------------------------------------------------------


def reference_self_attention(attn: SelfAttention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) V with the boolean mask spelled out (causal: a lower triangle)."""
    q, k, v = (split_heads(t, attn.n_heads) for t in attn.qkv(x).chunk(3, dim=-1))
    if attn.causal:
        mask = torch.ones(x.size(1), x.size(1), dtype=torch.bool).tril()
    return attn.out(merge_heads(attention_weights(q, k, mask) @ v))


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_sdpa_attention_equals_the_softmax_written_out(precision: str, tol: float) -> None:
    """Key padding as a boolean mask (encoder, cross-attention) and is_causal (decoder): SDPA's
    output is the reference's at every real query, in fp32 and within bf16 rounding."""
    torch.manual_seed(0)
    src = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, PAD, PAD]])
    mask = padding_mask(src)
    assert mask.dtype == torch.bool  # never a -1e9 float mask
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    encoder = SelfAttention(32, 4, 0.0, causal=False).eval()
    decoder = SelfAttention(32, 4, 0.0, causal=True).eval()
    cross = CrossAttention(32, 4, 0.0).eval()
    with torch.no_grad(), autocast(CPU, precision):
        pairs = [(encoder(x, mask), reference_self_attention(encoder, x, mask))]
        pairs.append((decoder(x), reference_self_attention(decoder, x, None)))
        q, (k, v) = split_heads(cross.q(x), 4), cross.memory_kv(memory)
        pairs.append((cross(x, (k, v), mask), cross.out(merge_heads(attention_weights(q, k, mask) @ v))))
    for fast, slow in pairs:
        torch.testing.assert_close(fast.float(), slow.float(), rtol=tol, atol=tol)


# batches ----------------------------------------------------------------------------------


def test_host_found_positions_select_what_a_boolean_mask_selects() -> None:
    """The loss positions come with the batch (found on the host): the logits and targets are
    the boolean mask's, bit for bit, so the step needs no GPU-side nonzero."""
    model = toy_model().eval()
    b = collate(toy_examples(6, random.Random(3)))
    keep = b.tgt_out != PAD
    assert b.n_tokens == len(b.positions) and torch.equal(b.target, b.tgt_out[keep])
    with torch.no_grad():
        assert torch.equal(model(b.src, b.tgt_in, b.positions), model(b.src, b.tgt_in, keep))


def update_gradients(model: torch.nn.Module, batch, precision: str = "fp32") -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    n_tokens = torch.tensor(float(batch.n_tokens))
    loss, _ = step.accumulate_gradients(model, [batch], n_tokens, label_smoothing=0.1, precision=precision)
    return loss, {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_bucketed_padding_gives_the_unpadded_loss_and_gradients(precision: str, tol: float) -> None:
    """Padding both sides up to a bucket changes shapes, not what the masks let through."""
    model = toy_model()
    examples = toy_examples(5, random.Random(1))
    plain, bucketed = collate(examples), collate(examples, buckets=(4, 16, 32))
    assert bucketed.src.shape[1] == bucketed.tgt_in.shape[1] == 16 > max(plain.src.shape[1], plain.tgt_in.shape[1])
    loss, grads = update_gradients(model, plain, precision)
    loss_b, grads_b = update_gradients(model, bucketed, precision)
    torch.testing.assert_close(loss_b, loss, rtol=tol, atol=tol)
    for k in grads:
        assert (grads_b[k] - grads[k]).norm() <= tol * grads[k].norm() + 1e-6, k


def test_token_batches_budget_the_bucketed_lengths() -> None:
    """With buckets a batch's rows times its bucket's length stay within max_tokens (as collate
    pads them); past the largest bucket lengths round up to a multiple of it."""
    rng = random.Random(0)
    lengths = [(rng.randint(1, 70), rng.randint(1, 70)) for _ in range(300)]
    buckets = (8, 16, 32, 48)
    batches = token_batches(lengths, 256, seed=1, epoch=0, buckets=buckets)
    assert sorted(i for b in batches for i in b) == list(range(300))
    for b in batches:
        longest = max(max(lengths[i]) for i in b)
        padded = next((x for x in buckets if longest <= x), -(-longest // 48) * 48)
        assert len(b) == 1 or len(b) * padded <= 256


def test_length_buckets_are_checked_before_the_run(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"data.length_buckets=\[32, 16\]"):
        loop.Trainer(tiny(tmp_path, "data.length_buckets=[32,16]"))


# deferred metrics -------------------------------------------------------------------------

RUN = ("trainer.max_steps=12", "trainer.log_every=3", "trainer.eval_every=1000", "model.dropout=0.1")


def comparable(run_dir: Path) -> list[dict]:
    """The training records without the clock's fields."""
    return [{k: v for k, v in r.items() if k not in ("minutes", "tokens_per_s")} for r in train_records(run_dir)]


@pytest.mark.slow
def test_deferred_metrics_log_what_per_step_reading_logs(tmp_path: Path) -> None:
    """Loss, token counts and the finite check kept on the device and read at log steps: the
    same records and the same weights as reading them after every update."""
    plain, deferred = tmp_path / "plain", tmp_path / "deferred"
    loop.train(tiny(plain, *RUN, "trainer.deferred_metrics=false"))
    loop.train(tiny(deferred, *RUN, "trainer.deferred_metrics=true"))
    assert comparable(deferred) == comparable(plain) and len(comparable(plain)) == 5  # steps 1, 3, 6, 9, 12
    a, b = weights(plain / "checkpoints/last.pt"), weights(deferred / "checkpoints/last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_deferred_metrics_skip_nonfinite_updates_then_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A NaN loss leaves the weights as they were (the fused AdamW skips the update on the
    device); the log step reports it, and trainer.max_bad_steps in a row stop the run with
    the weights from before the problem saved."""
    overrides = ("trainer.max_bad_steps=3", "trainer.eval_every=1000", "trainer.log_every=2")
    trainer = loop.Trainer(tiny(tmp_path, *overrides, "trainer.deferred_metrics=true"))
    before = poison_losses(monkeypatch, trainer, good=4)
    with pytest.raises(UserError, match="4 consecutive non-finite steps after step 8"):
        trainer.run()
    assert any("2 non-finite updates since the last log line" in r.getMessage() for r in caplog.records)
    ckpt = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert ckpt["progress"]["step"] == 8
    assert all(torch.equal(v, before["weights"][k]) for k, v in ckpt["model"].items())


def test_tally_counts_runs_of_nonfinite_updates() -> None:
    tally = step.Tally(CPU)
    for finite in (True, False, False, True, False):
        tally.add(torch.tensor(finite))
    assert tally.read() == (3, 2)
    tally.add(torch.tensor(False))  # the run in progress carries over
    assert tally.read() == (1, 2)


# torch.compile ----------------------------------------------------------------------------


def compiled_graphs(monkeypatch: pytest.MonkeyPatch, buckets: tuple[int, ...]) -> int:
    """Graphs dynamo builds for 12 training batches of changing rows and lengths, compiled as
    the trainer compiles (build.compiled); each batch's loss equals the eager model's."""
    from torch._dynamo.testing import CompileCounter  # here: importing dynamo costs every test run seconds

    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(torch, "compile", lambda net, **kw: COMPILE(net, backend=counter, **kw))
    model = toy_model()
    net = build.compiled(model, list(buckets))
    rng = random.Random(0)
    for i in range(12):
        examples = toy_examples(rng.randint(1, 6), rng)
        if i % 3 == 0:  # longer pairs: another bucket
            examples = [type(e)(e.src * 3, e.tgt * 2) for e in examples]
        batch = collate(examples, buckets=buckets)
        n_tokens = torch.tensor(float(batch.n_tokens))
        loss, _ = step.accumulate_gradients(net, [batch], n_tokens, label_smoothing=0.1, precision="fp32")
        eager, _ = step.accumulate_gradients(model, [batch], n_tokens, label_smoothing=0.1, precision="fp32")
        torch.testing.assert_close(loss, eager)
    torch._dynamo.reset()
    return counter.frame_count


@pytest.mark.slow
def test_compile_builds_a_bounded_number_of_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Token-budget batches change rows and lengths at every step; the compiled model still
    builds one graph (two with a single-row batch), or one per length bucket (two with a
    single-row batch), never one per batch."""
    assert compiled_graphs(monkeypatch, ()) <= 2
    assert 1 <= compiled_graphs(monkeypatch, (16, 32, 64)) <= 2 * 3


@pytest.mark.slow
def test_compiled_training_run_matches_its_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.compile with length buckets and deferred metrics through the loop (dynamo
    traces; the graphs run eagerly): the run trains and logs every update."""
    monkeypatch.setattr(torch, "compile", lambda net, **kw: COMPILE(net, backend="eager", **kw))
    over = ("trainer.compile=true", "data.length_buckets=[16,32]", "trainer.deferred_metrics=true")
    loop.train(tiny(tmp_path, "trainer.max_steps=4", "trainer.log_every=1", "trainer.eval_every=1000", *over))
    assert [s for s, _, _ in losses(tmp_path)] == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in train_records(tmp_path))


# scripts/gpu_check.sh ---------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_table_reads_every_part(tmp_path: Path) -> None:
    """One table from the parts' JSON and metrics: speed ratios against HF (training) and
    CTranslate2 (decoding); a part that timed out is named."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from gpu_table import table

    row = {"precision": "bf16", "ms_per_step": 1.0, "peak_mem_mb": 900.0, "tflops": 1.0, "peak_tflops": 2.0}
    train = [row | {"impl": "ours", "tokens_per_s": 300.0, "mfu": 0.4, "mfu_datasheet": 0.3}]
    train.append(row | {"impl": "hf", "tokens_per_s": 200.0, "mfu": 0.2, "mfu_datasheet": None})
    (tmp_path / "bench_train.json").write_text(json.dumps(train))
    (tmp_path / "wmt").mkdir()
    logs = [{"step": s, "tokens_per_s": v, "peak_mem_mb": 5000.0} for s, v in ((1, 10.0), (25, 900.0), (50, 1100.0))]
    (tmp_path / "wmt/metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logs))
    (tmp_path / "wmt/results.json").write_text(json.dumps({"precision": "bf16"}))
    decode = [
        {"system": s, "beam": 5, "sent_per_s": v, "tok_per_s": 10 * v} for s, v in (("ours", 30.0), ("ct2-fp32", 20.0))
    ]
    (tmp_path / "bench_decode.json").write_text(json.dumps([d | {"gpu_peak_mib": 100.0} for d in decode]))
    (tmp_path / "status.txt").write_text("cuda_tests 0\nbench_compiled 124\n")
    lines = table(tmp_path).splitlines()
    assert "| train step | ours | bf16 | 300 | 40.0% | 30.0% | 900 | - | 1.50x HF |" in lines
    assert "| WMT14 recipe, 50 updates | ours (trainer) | bf16 | 1000 | - | - | 5000 | - | - |" in lines
    assert "| decode beam 5 | ours | fp32 | 300 | - | - | 100 | 30.0 | 1.50x ct2-fp32 |" in lines
    assert lines[-1] == "failed parts: bench_compiled: timed out"


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("GPU_CHECK_DRY_RUN"), reason="~15 min on 2 busy cores: GPU_CHECK_DRY_RUN=1 runs it"
)
def test_gpu_check_runs_every_part_on_the_cpu(tmp_path: Path) -> None:
    """CPU=1: the script's every part at tiny sizes (inductor's C++ compile included), then its table."""
    import subprocess
    import sys

    env = os.environ | {"CPU": "1", "PYTHON": sys.executable, "STEP_TIMEOUT_SCALE": "10", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts/gpu_check.sh"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert {r.split(" | ")[1] for r in rows} >= {"ours", "hf", "ours+compile", "ours (trainer)"}
    assert sum(r.startswith("| decode beam 2 |") for r in rows) == 2
