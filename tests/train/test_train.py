"""Training at full strength: exact resume after SIGKILL, corrupt checkpoints, NaN guard,
SIGTERM, bf16, gradient accumulation, early stopping, averaging, torch.compile,
TensorBoard, DDP on gloo, streaming. Every run is the tiny experiment (seconds on a CPU)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from conftest import compose_config
from training import (
    ENV,
    assert_learns_with_fp32_weights,
    last_step,
    losses,
    poison_losses,
    tiny,
    torchrun,
    toy_examples,
    toy_model,
    train_command,
    weights,
)
from transformer.checkpoint import load_checkpoint
from transformer.cli.average import main as average_main
from transformer.data.batching import Example, collate
from transformer.data.builtin import builtin_splits
from transformer.data.tokenizer import build_tokenizer
from transformer.errors import UserError
from transformer.train import loop, step, validation
from transformer.vocab import BOS

# 200 tiny pairs at max_tokens=512 make 8 batches an epoch: 40 steps cross 4 epoch boundaries,
# and a checkpoint every 5 steps is never at an epoch boundary before the end.
KILL_RUN = [
    "experiment=tiny",
    "model.dropout=0.1",
    "trainer.max_steps=40",
    "trainer.log_every=1",
    "trainer.save_every=5",
    "trainer.eval_every=1000",
    "evaluate_test=false",
]


def start_and_signal(run_dir: Path, overrides: Sequence[str], at_step: int, sig: int) -> subprocess.Popen:
    """Start a training run (output in ``<run_dir>.log``) and send ``sig`` once it has logged
    step ``at_step``."""
    with open(run_dir.with_suffix(".log"), "w") as out:
        proc = subprocess.Popen(
            train_command(run_dir, *overrides), cwd=run_dir.parent, env=ENV, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.time() + 60
    while last_step(run_dir) < at_step:
        assert proc.poll() is None, run_dir.with_suffix(".log").read_text()[-2000:]
        assert time.time() < deadline, "the run never reached the step"
        time.sleep(0.002)
    os.kill(proc.pid, sig)
    return proc


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path: Path) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    done = subprocess.run(train_command(full, *KILL_RUN), cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    proc = start_and_signal(killed, KILL_RUN, at_step=7, sig=signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    progress = load_checkpoint(killed / "checkpoints/last.pt")["progress"]
    assert progress["step"] < 40 and 0 < progress["batch_in_epoch"] < 8, progress  # killed mid-epoch, before the end

    resumed = subprocess.run(
        train_command(killed, *KILL_RUN, f"trainer.resume={killed}"),
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(killed) == losses(full)  # exactly: same batches, same dropout masks
    assert [s for s, _, _ in losses(killed)] == list(range(1, 41))
    assert {e for _, e, _ in losses(full)} == {0, 1, 2, 3, 4}
    a, b = weights(full / "checkpoints/last.pt"), weights(killed / "checkpoints/last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bidirectional_epochs_train_each_pair_both_ways_then_forward_only(tmp_path: Path) -> None:
    trainer = loop.Trainer(tiny(tmp_path, "trainer.bidirectional_epochs=1"))
    pair = lambda e: (tuple(e.src), tuple(e.tgt))  # noqa: E731
    forward = Counter(map(pair, trainer.data.train_examples))
    reverse = Counter(
        (tuple(t[1:]), (BOS, *s)) for s, t in forward.elements()
    )  # src = pieces + EOS, tgt = BOS + pieces + EOS
    first = Counter(pair(e) for batch in trainer.data.epoch_batches(0) for e in batch)
    assert first == forward + reverse
    second = Counter(pair(e) for batch in trainer.data.epoch_batches(1) for e in batch)
    assert second == forward
    with pytest.raises(UserError, match="bidirectional_epochs needs data.joint_vocab=true"):
        loop.Trainer(tiny(tmp_path / "separate", "trainer.bidirectional_epochs=1", "data.joint_vocab=false"))


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = start_and_signal(
        run_dir,
        ["experiment=tiny", "trainer.max_steps=100000", "trainer.log_every=1", "trainer.eval_every=100000"],
        5,
        signal.SIGTERM,
    )
    assert proc.wait(timeout=60) == 0, run_dir.with_suffix(".log").read_text()[-2000:]
    assert json.loads((run_dir / "results.json").read_text())["interrupted"] is True
    assert load_checkpoint(run_dir / "checkpoints/last.pt")["progress"]["step"] == last_step(run_dir) >= 5
    assert not (run_dir / "test.hyp.txt").exists()  # no test evaluation on the way out


def test_corrupt_last_checkpoint_falls_back_to_newest_step(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    loop.train(
        tiny(tmp_path, "trainer.max_steps=9", "trainer.save_every=3", "trainer.eval_every=1000", "trainer.log_every=1")
    )
    last = tmp_path / "checkpoints/last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(UserError, match="last.pt: not a readable checkpoint"):
        load_checkpoint(last)

    result = loop.train(
        tiny(
            tmp_path,
            "trainer.max_steps=12",
            "trainer.eval_every=1000",
            "trainer.log_every=1",
            f"trainer.resume={tmp_path}",
            "trainer.resume_allow=[trainer.max_steps]",  # the cosine schedule depends on it
        )
    )
    assert result["step"] == 12
    assert any("skipping unreadable checkpoint" in r.message for r in caplog.records)
    assert any("resuming from" in r.getMessage() and "step_00000009.pt" in r.getMessage() for r in caplog.records)
    assert [s for s, _, _ in losses(tmp_path)] == list(range(1, 13))


def test_nan_steps_are_skipped_then_the_run_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = loop.Trainer(tiny(tmp_path, "trainer.max_bad_steps=3", "trainer.eval_every=1000", "trainer.log_every=1"))
    before = poison_losses(monkeypatch, trainer, good=4)
    with pytest.raises(UserError, match="3 consecutive non-finite steps after step 4"):
        trainer.run()
    assert sum("non-finite" in r.getMessage() for r in caplog.records) == 3
    ckpt = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert ckpt["progress"]["step"] == 4
    assert all(torch.equal(v, before["weights"][k]) for k, v in ckpt["model"].items())


@pytest.mark.slow
def test_bf16_on_cpu_trains(tmp_path: Path) -> None:
    assert_learns_with_fp32_weights(tmp_path, "trainer.precision=bf16")


def test_fp16_on_cpu_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        loop.Trainer(tiny(tmp_path, "trainer.precision=fp16", "trainer.device=cpu"))


def gradients(
    model: torch.nn.Module, groups: list[list[Example]], **kwargs
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss sum, parameter gradients) of one update over ``groups`` (one batch each)."""
    model.zero_grad(set_to_none=True)
    batches = [collate(g) for g in groups]
    n_tokens = torch.tensor(float(sum(b.n_tokens for b in batches)))
    loss, _ = step.accumulate_gradients(model, batches, n_tokens, label_smoothing=0.1, precision="fp32", **kwargs)
    return loss, {k: p.grad.clone() for k, p in model.named_parameters()}


def test_accumulating_two_batches_equals_one_double_batch() -> None:
    model = toy_model()
    rng = random.Random(0)
    first, second = toy_examples(3, rng), toy_examples(4, rng)
    loss_two, grads_two = gradients(model, [first, second])
    loss_one, grads_one = gradients(model, [first + second])  # one batch, padded to the longest of both
    torch.testing.assert_close(loss_two, loss_one)
    for k in grads_one:
        torch.testing.assert_close(grads_two[k], grads_one[k], rtol=1e-4, atol=1e-7)


def test_rdrop_without_dropout_is_the_plain_loss() -> None:
    """Without dropout the two passes agree (KL 0): R-Drop's loss and gradient are the plain ones."""
    model = toy_model()
    examples = toy_examples(5, random.Random(1))
    loss, grads = gradients(model, [examples])
    loss_r, grads_r = gradients(model, [examples], rdrop_alpha=5.0)
    torch.testing.assert_close(loss_r, loss)
    for k in grads:
        torch.testing.assert_close(grads_r[k], grads[k], rtol=1e-4, atol=1e-7)


def test_rdrop_adds_the_disagreement_of_two_dropout_passes() -> None:
    model = toy_model(dropout=0.3)
    examples = toy_examples(5, random.Random(1))
    torch.manual_seed(2)
    weak, _ = gradients(model, [examples], rdrop_alpha=1e-6)
    torch.manual_seed(2)  # the same dropout masks: only alpha differs
    strong, _ = gradients(model, [examples], rdrop_alpha=4.0)
    assert strong > weak + 1e-3


def test_early_stopping_on_validation_bleu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validation.sacrebleu, "corpus_bleu", lambda hyps, refs: SimpleNamespace(score=1.0))
    result = loop.train(tiny(tmp_path, "trainer.patience=2", "trainer.eval_every=2", "trainer.max_steps=100"))
    assert result["step"] == 6  # best at step 2, no gain at 4 and 6
    assert result["best_step"] == 2


@pytest.fixture(scope="module")
def averaged_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six steps, a checkpoint every two, end-of-training averaging of the last three."""
    run_dir = tmp_path_factory.mktemp("averaged") / "run"
    loop.train(
        tiny(
            run_dir,
            "trainer.max_steps=6",
            "trainer.save_every=2",
            "trainer.eval_every=6",
            "trainer.keep_last=1",
            "trainer.average_last=3",
            "trainer.log_every=1",
        )
    )
    return run_dir


def test_keep_every_spares_snapshots_from_pruning(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    loop.train(
        tiny(
            run_dir,
            "trainer.max_steps=7",
            "trainer.save_every=1",
            "trainer.eval_every=7",
            "trainer.keep_last=2",
            "trainer.keep_every=3",
        )
    )
    steps = [p.name for p in sorted((run_dir / "checkpoints").glob("step_*.pt"))]
    assert steps == ["step_00000003.pt", "step_00000006.pt", "step_00000007.pt"]


def test_average_last_at_the_end_of_training(averaged_run: Path) -> None:
    steps = sorted((averaged_run / "checkpoints").glob("step_*.pt"))
    assert [p.name for p in steps] == [
        "step_00000002.pt",
        "step_00000004.pt",
        "step_00000006.pt",
    ]  # average_last > keep_last
    averaged = weights(averaged_run / "checkpoints/averaged.pt")
    parts = [weights(p) for p in steps]
    for k, v in averaged.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, sum(p[k] for p in parts) / 3)


def test_average_command(averaged_run: Path, tmp_path: Path) -> None:
    a, b = averaged_run / "checkpoints/step_00000002.pt", averaged_run / "checkpoints/step_00000006.pt"
    average_main([f"inputs=[{a},{a},{a}]", f"output={tmp_path / 'same.pt'}"])
    same, first = weights(tmp_path / "same.pt"), weights(a)
    assert all(torch.equal(same[k], first[k]) for k in first)

    average_main([f"inputs={averaged_run}", f"output={tmp_path / 'mean.pt'}", "last=2"])  # step 4 and step 6
    mean, w4, w6 = weights(tmp_path / "mean.pt"), weights(averaged_run / "checkpoints/step_00000004.pt"), weights(b)
    assert any(not torch.equal(w4[k], w6[k]) for k in w4)  # the two differ, so the mean means something
    for k, v in mean.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (w4[k] + w6[k]) / 2)

    with pytest.raises(SystemExit) as exit_info:
        average_main([f"inputs={averaged_run}", "outptu=x.pt"])
    assert exit_info.value.code == 2


def test_tensorboard_logs(averaged_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(averaged_run / "tb"))
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "valid/bleu", "valid/nll"):
        assert tag in tags["scalars"], tag
    assert any("valid/translations" in t for t in tags["tensors"])


@pytest.mark.slow  # compiling takes seconds even with the eager backend: make test-all runs both
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compile_saves_plain_state_dict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """Dynamo traces the model either way; only the slow case generates code (~1 min on 2 cores)."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend=backend, **kw))
    result = loop.train(tiny(tmp_path, "trainer.compile=true", "trainer.max_steps=3", "trainer.eval_every=3"))
    assert result["step"] == 3
    ckpt = weights(tmp_path / "checkpoints/last.pt")
    assert not any("_orig_mod" in k for k in ckpt)
    assert all(torch.isfinite(v).all() for v in ckpt.values() if v.is_floating_point())


@pytest.mark.slow
def test_ddp_equals_one_process_with_accumulation(tmp_path: Path) -> None:
    """Two gloo ranks take batches b0 and b1 of each pair; one process with update_freq=2 takes
    [b0, b1]: same updates. The distributed run also stops at step 6 and resumes to 10."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    constant = "trainer.schedule=constant"  # the learning rate must not depend on max_steps, which changes
    torchrun(ddp, constant, "trainer.max_steps=6")
    torchrun(ddp, constant, "trainer.max_steps=10", f"trainer.resume={ddp}")
    loop.train(
        tiny(
            single,
            constant,
            "trainer.update_freq=2",
            "trainer.max_steps=10",
            "trainer.log_every=1",
            "trainer.eval_every=1000",
        )
    )
    one, two = losses(single), losses(ddp)
    assert [(s, e) for s, e, _ in two] == [(s, e) for s, e, _ in one] and one[-1][:2] == (10, 2)  # two epoch boundaries
    assert [loss for _, _, loss in two] == pytest.approx([loss for _, _, loss in one], rel=1e-5)
    a, b = weights(single / "checkpoints/last.pt"), weights(ddp / "checkpoints/last.pt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert not list(ddp.glob("**/rank1*"))


@pytest.fixture(scope="module")
def jsonl_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local dataset directory: train/validation/test JSON lines with a translation column."""
    directory = tmp_path_factory.mktemp("jsonl_dataset")
    for split, pairs in builtin_splits(200, 20, 20, 1234).items():
        name = {"valid": "validation"}.get(split, split)
        lines = (json.dumps({"translation": {"en": s, "de": t}}) for s, t in pairs)
        (directory / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def test_stream_batches_cover_every_pair_once_per_epoch(jsonl_dataset: Path) -> None:
    from transformer.data.sources import corpus_source
    from transformer.data.streaming import stream_batches

    cfg = compose_config(
        "train",
        [
            "data=hub",
            f"data.hub_name={jsonl_dataset}",
            "data.streaming=true",
            "data.shuffle_buffer=64",
            "data.max_tokens=512",
        ],
    ).data
    source = corpus_source(cfg)
    pairs = list(source.stream())
    tok = build_tokenizer(pairs, 200, True, 1000)
    every = [tuple(e.tgt) for b in stream_batches(source, tok, 128, seed=1, epoch=0) for e in b]
    assert sorted(every) == sorted(map(tuple, tok.encode_tgt([t for _, t in pairs])))
    assert every != [
        tuple(e.tgt) for b in stream_batches(source, tok, 128, seed=1, epoch=1) for e in b
    ]  # a new order each epoch
    shards = [list(stream_batches(source, tok, 128, seed=1, epoch=0, rank=r, world=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) > 0  # equal counts keep DDP collectives in step
    seen = Counter(tuple(e.tgt) for shard in shards for b in shard for e in b)
    assert not seen - Counter(every)  # disjoint: no pair twice across the ranks


@pytest.mark.slow
def test_streaming_training_resumes_exactly(tmp_path: Path, jsonl_dataset: Path) -> None:
    data = [
        "data=hub",
        f"data.hub_name={jsonl_dataset}",
        "data.streaming=true",
        "data.shuffle_buffer=64",
        "data.vocab_size=200",
        "data.max_tokens=512",
    ]
    common = [*data, "trainer.log_every=1", "trainer.eval_every=1000", "trainer.schedule=constant"]
    full, split = tmp_path / "full", tmp_path / "split"
    loop.train(tiny(full, *common, "trainer.max_steps=14"))
    loop.train(tiny(split, *common, "trainer.max_steps=5"))
    loop.train(tiny(split, *common, "trainer.max_steps=14", f"trainer.resume={split}"))
    assert losses(split) == losses(full)
    assert losses(full)[-1][1] >= 1  # crossed an epoch boundary
