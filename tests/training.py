"""Tiny training runs shared by the tests: composed configs, the records a run writes, torchrun."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from conftest import compose_config
from serve_live import free_port
from tiny import tiny_config
from transformer.checkpoint import load_checkpoint
from transformer.data.batching import Example
from transformer.model import build_model
from transformer.train import loop, step
from transformer.vocab import BOS, EOS

TINY_MODEL = [
    "model.d_model=32",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.n_encoder_layers=1",
    "model.n_decoder_layers=1",
    "model.dropout=0.0",
    "model.max_positions=128",
]


QUICK = ["trainer.progress=false", "trainer.threads=1", "trainer.precision=fp32", "trainer.warmup_steps=5"]


def train_quietly(cfg) -> dict:
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return loop.train(cfg)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


ROOT = Path(__file__).resolve().parents[1]


ENV = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def tiny(run_dir: Path, *overrides: str) -> DictConfig:
    return compose_config("train", ["experiment=tiny", "evaluate_test=false", f"run_dir={run_dir}", *overrides])


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def losses(run_dir: Path) -> list[tuple[int, int, float]]:
    return [(r["step"], r["epoch"], r["loss"]) for r in train_records(run_dir)]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def train_command(run_dir: Path, *overrides: str) -> list[str]:
    script = Path(sys.executable).parent / "transformer-train"
    return [str(script), *overrides, f"run_dir={run_dir}", f"hydra.run.dir={run_dir}"]


def last_step(run_dir: Path) -> int:
    """Step of the newest complete line of metrics.jsonl (0 before the first)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if line.endswith("\n")]
    return json.loads(lines[-1])["step"] if lines else 0


def poison_losses(monkeypatch: pytest.MonkeyPatch, trainer: loop.Trainer, good: int) -> dict:
    """After ``good`` updates every training loss is NaN; returns {"weights": the model's
    state just before the first NaN}, filled in when it comes."""
    real, calls, before = step.label_smoothed_loss, [0], {}

    def poisoned(logits, target, smoothing):
        calls[0] += 1
        loss, nll = real(logits, target, smoothing)
        if calls[0] <= good:
            return loss, nll
        before.setdefault("weights", {k: v.clone() for k, v in trainer.model.state_dict().items()})
        return loss * float("nan"), nll

    monkeypatch.setattr(step, "label_smoothed_loss", poisoned)
    return before


def assert_learns_with_fp32_weights(run_dir: Path, *overrides: str) -> None:
    """40 updates at a high rate lower the loss by 0.5; the checkpoint holds finite fp32 CPU
    weights whatever the autocast precision or device."""
    loop.train(
        tiny(
            run_dir,
            "trainer.max_steps=40",
            "trainer.log_every=1",
            "trainer.eval_every=1000",
            "trainer.lr=3e-3",
            *overrides,
        )
    )
    curve = [loss for _, _, loss in losses(run_dir)]
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.5
    state = weights(run_dir / "checkpoints/last.pt")
    assert all(
        v.dtype == torch.float32 and v.device.type == "cpu" and torch.isfinite(v).all()
        for v in state.values()
        if v.is_floating_point()
    )


def toy_model(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(tiny_config(40, n_heads=2, n_encoder_layers=1, n_decoder_layers=1, dropout=dropout))


def toy_examples(n: int, rng: random.Random) -> list[Example]:
    words = lambda: [rng.randrange(4, 40) for _ in range(rng.randint(1, 9))]  # noqa: E731
    return [Example(words() + [EOS], [BOS] + words() + [EOS]) for _ in range(n)]


def torchrun(run_dir: Path, *overrides: str, device: str = "cpu") -> None:
    """Two ranks of the tiny experiment: gloo on CPU, NCCL on CUDA."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(ROOT / "scripts/train.py"),
        "experiment=tiny",
        f"trainer.device={device}",
        "trainer.log_every=1",
        "trainer.eval_every=1000",
        "evaluate_test=false",
        f"run_dir={run_dir}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    done = subprocess.run(command, cwd=run_dir.parent, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
