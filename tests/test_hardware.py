"""Hardware-aware defaults: precision auto, timed kernel choice, and the time budget."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import compose_config
from transformer import hardware
from transformer.config import ModelConfig, setting
from transformer.errors import UserError
from transformer.hardware import Hardware, read_cpu_flags, resolve_precision
from transformer.model import build_model
from transformer.model.kernels import onednn_shapes, shape_of
from transformer.model.onednn_linear import train_linears_on_onednn
from transformer.model.prepack import packed_for_cpu
from transformer.train import budget, loop

CPU = torch.device("cpu")
AVX2 = Hardware(
    machine="x86_64", cpu_flags=("avx2",), aten_capability="AVX2", onednn_max_isa=None, onednn_bf16=False, threads=2
)
SAPPHIRE = replace(
    AVX2, cpu_flags=("avx2", "avx512f", "avx512_bf16", "amx_bf16"), aten_capability="AVX512", onednn_bf16=True
)


def test_auto_precision_follows_native_bf16() -> None:
    assert resolve_precision("auto", CPU, "trainer.precision", AVX2) == "fp32"
    assert resolve_precision("auto", CPU, "trainer.precision", SAPPHIRE) == "bf16"
    assert (
        resolve_precision("auto", torch.device("cuda"), "trainer.precision", replace(AVX2, cuda="H200", cuda_bf16=True))
        == "bf16"
    )
    assert resolve_precision("fp32", CPU, "trainer.precision", SAPPHIRE) == "fp32"  # explicit wins


def test_emulation_caps_count() -> None:
    capped = replace(SAPPHIRE, onednn_max_isa="AVX2")
    assert not capped.cpu_bf16_native and capped.cpu_class == "avx2"
    assert SAPPHIRE.cpu_bf16_native and SAPPHIRE.cpu_class == "amx"
    assert replace(SAPPHIRE, cpu_flags=("avx2", "avx512f")).cpu_class == "avx512"
    assert json.dumps(SAPPHIRE.to_dict())  # goes into results.json as it is


def test_explicit_bf16_on_emulating_cpu_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    hardware.warn_emulated_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="transformer.hardware"):
        for _ in range(3):
            assert resolve_precision("bf16", CPU, "trainer.precision", AVX2) == "bf16"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "emulated" in warnings[0] and "slower than fp32" in warnings[0], warnings


def test_bad_settings_name_their_key() -> None:
    with pytest.raises(UserError, match="trainer.precision='fp8': expected one of auto, fp32, bf16, fp16"):
        resolve_precision("fp8", CPU, "trainer.precision", AVX2)
    with pytest.raises(UserError, match="trainer.onednn_linear='maybe': expected one of auto, true, false"):
        setting("maybe", "trainer.onednn_linear")
    assert setting(True, "decode.prepack") == "true" and setting("AUTO", "decode.prepack") == "auto"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n", encoding="utf-8")
    assert read_cpu_flags(str(info)) == ("avx2", "avx512f", "avx512_bf16")
    assert read_cpu_flags(str(tmp_path / "missing")) == ()


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=32,
        n_heads=4,
        n_encoder_layers=1,
        n_decoder_layers=1,
        d_ff=64,
        dropout=0.0,
        src_vocab_size=300,
        tgt_vocab_size=300,
    )
    return build_model(cfg)


def logits_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    src = torch.randint(4, 300, (3, 7), generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(4, 300, (3, 5), generator=torch.Generator().manual_seed(2))
    model.zero_grad()
    logits = model(src, tgt)
    logits.float().logsumexp(-1).sum().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("training", [True, False])
def test_timed_kernel_choice_is_valid_and_exact(training: bool) -> None:
    model = small_model()
    shapes = {shape_of(m) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    chosen = onednn_shapes(model, rows=64, training=training)
    assert chosen <= shapes
    reference, grads = logits_and_grads(model)
    for pick in (chosen, shapes):  # the timed choice, and oneDNN everywhere
        if training:
            other = train_linears_on_onednn(small_model(), pick)
            logits, other_grads = logits_and_grads(other)
            for a, b in zip(other_grads, grads):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        else:
            with torch.inference_mode():
                logits = packed_for_cpu(model, pick)(*logits_inputs())
                reference = model(*logits_inputs())
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


def logits_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(4, 300, (3, 7), generator=torch.Generator().manual_seed(1)), torch.randint(
        4, 300, (3, 5), generator=torch.Generator().manual_seed(2)
    )


def schedule(**overrides: float) -> SimpleNamespace:
    return SimpleNamespace(
        **{
            "max_steps": 10000,
            "warmup_steps": 800,
            "eval_every": 1000,
            "save_every": 150,
            "max_minutes": 0.0,
            **overrides,
        }
    )


def test_plan_scales_the_whole_schedule() -> None:
    costs = budget.Costs(spent=60, step=1.8, evaluation=30, test=90)
    plan = budget.plan_schedule(schedule(), 60, costs)
    usable = 3600 * (1 - budget.MARGIN)
    evals = int(budget.EVAL_SHARE * usable // 30)  # 5 of the reference 10 fit in 5% of the hour
    assert plan.max_steps == int((usable - 60 - 90 - evals * 30) // 1.8)
    ratio = plan.max_steps / 10000
    assert plan.save_every == round(150 * ratio)
    assert plan.warmup_steps == min(800, round(budget.MAX_WARMUP_SHARE * plan.max_steps))  # not 800 * ratio
    assert plan.eval_every == -(-plan.max_steps // evals)
    assert plan.max_minutes == pytest.approx((usable - 60 - 90) / 60)
    fast = budget.plan_schedule(schedule(max_minutes=50), 60, budget.Costs(spent=30, step=0.2, evaluation=5, test=20))
    assert fast.max_steps > 10000 and fast.eval_every == -(-fast.max_steps // 10) and fast.max_minutes == 50
    assert fast.warmup_steps == round(800 * fast.max_steps / 10000)  # a longer schedule scales its warmup


def test_planned_warmup_keeps_the_reference_warmup_in_a_shorter_run() -> None:
    assert budget.planned_warmup(800, 0.1048, 1048) == 262  # a quarter of the updates, not 84
    assert budget.planned_warmup(800, 0.5, 5000) == 800  # the reference's, where it fits
    assert budget.planned_warmup(800, 2.0, 20000) == 1600
    assert budget.planned_warmup(0, 0.1, 1000) == 0 and budget.planned_warmup(800, 0.001, 2) == 1


def test_plan_refuses_a_budget_without_room_for_one_evaluation() -> None:
    with pytest.raises(UserError, match=r"trainer.time_budget_minutes=1 is too small: start-up took 0.8 min"):
        budget.plan_schedule(schedule(), 1, budget.Costs(spent=50, step=1, evaluation=30, test=5))


def budgeted(run_dir: Path, *overrides: str):
    return compose_config(
        "train",
        [
            "experiment=tiny",
            "evaluate_test=false",
            f"run_dir={run_dir}",
            "trainer.log_every=1",
            "trainer.precision=fp32",
            "model.dropout=0.1",
            "trainer.save_every=3",
            *overrides,
        ],
    )


def train_quietly(cfg) -> dict:
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return loop.train(cfg)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines())
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def tick_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """A clock that moves ``seconds`` on every reading."""
    now = iter(range(10**6))
    monkeypatch.setattr(budget, "clock", lambda: next(now) * seconds)


def test_time_budget_fixes_the_schedule_and_resume_keeps_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tick = 16.0  # every reading of the clock moves it 16 s
    tick_clock(monkeypatch, tick)
    common = ["trainer.time_budget_minutes=5", "trainer.max_steps=20"]
    full = train_quietly(budgeted(tmp_path / "full", *common))
    plan = full["budget_plan"]
    # readings: start 0; 5 timed updates (8 batches an epoch, 3 untimed) 1-2; valid loss 3-4;
    # valid search 5-6; test search 7-8 (the sample is the whole 20-sentence split); spent at 9
    measured = budget.Costs(**plan["measured"])
    assert (measured.spent, measured.step) == (9 * tick, tick / 5)
    assert (
        tick < measured.evaluation <= 2 * tick and 0 < measured.test <= tick
    )  # searches scaled to the references' length
    t = SimpleNamespace(max_steps=20, warmup_steps=5, eval_every=10, save_every=3, max_minutes=0.0)
    assert {k: v for k, v in plan.items() if k != "measured"} == budget.plan_schedule(t, 5, measured).to_dict()
    assert full["step"] == plan["max_steps"] > 20 and plan["warmup_steps"] > 5
    # the same run without a budget but with the planned settings: the timed updates left no trace
    fixed = [f"trainer.{k}={v}" for k, v in plan.items() if k not in ("max_minutes", "measured")]
    same = train_quietly(budgeted(tmp_path / "same", *fixed))
    assert losses(tmp_path / "same") == losses(tmp_path / "full") and same["step"] == full["step"]
    # stopped after two epochs, then resumed under a clock that would plan otherwise: the stored plan holds
    split = tmp_path / "split"
    train_quietly(budgeted(split, *common, "trainer.max_epochs=2"))
    tick_clock(monkeypatch, 1.0)
    resumed = train_quietly(budgeted(split, *common, f"trainer.resume={split}"))
    assert resumed["budget_plan"] == plan
    assert losses(split) == losses(tmp_path / "full")


def test_time_budget_too_small_fails_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tick_clock(monkeypatch, 10.0)
    with pytest.raises(UserError, match="trainer.time_budget_minutes=0.1 is too small"):
        train_quietly(budgeted(tmp_path / "run", "trainer.time_budget_minutes=0.1"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(UserError, match="trainer.time_budget_minutes=-1.0 must be >= 0"):
        train_quietly(budgeted(tmp_path / "neg", "trainer.time_budget_minutes=-1"))


def test_results_name_the_hardware_and_precision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "detect", lambda: AVX2)  # a machine without native bf16
    metrics = train_quietly(
        compose_config(
            "train", ["experiment=tiny", "evaluate_test=false", f"run_dir={tmp_path}", "trainer.max_steps=2"]
        )
    )
    saved = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert metrics["precision"] == saved["precision"] == "fp32"
    assert saved["hardware"]["cpu_class"] in ("avx2", "avx512", "avx512_bf16", "amx", "x86_64", "aarch64", "arm64")


def test_allocator_env_preloads_mimalloc_once() -> None:
    from transformer.runtime import allocator_env

    lib = "/x/libmimalloc.so"
    assert allocator_env({}, lib)["LD_PRELOAD"] == lib
    assert allocator_env({}, lib)["MIMALLOC_PURGE_DELAY"] == "-1"  # freed pages kept: faster steps
    assert allocator_env({"MIMALLOC_PURGE_DELAY": "10"}, lib)["MIMALLOC_PURGE_DELAY"] == "10"  # the user's wins
    assert allocator_env({"LD_PRELOAD": "/y/other.so"}, lib)["LD_PRELOAD"] == f"{lib} /y/other.so"
    assert allocator_env({"LD_PRELOAD": lib}, lib) is None  # already running under it: no loop
    assert allocator_env({"TRANSFORMER_ALLOCATOR": "system"}, lib) is None
    assert allocator_env({}, None) is None  # not installed: the system allocator, silently
    with pytest.raises(UserError, match="TRANSFORMER_ALLOCATOR=mimalloc but it is not installed"):
        allocator_env({"TRANSFORMER_ALLOCATOR": "mimalloc"}, None)
    with pytest.raises(UserError, match="TRANSFORMER_ALLOCATOR='jemalloc': expected one of auto, mimalloc, system"):
        allocator_env({"TRANSFORMER_ALLOCATOR": "jemalloc"}, lib)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_use_fast_allocator_reruns_the_process_under_mimalloc() -> None:
    from transformer.runtime import mimalloc_library

    if mimalloc_library() is None:
        pytest.skip("cmeel-mimalloc is not installed")
    code = "from transformer.runtime import use_fast_allocator, active_allocator; use_fast_allocator(); print(active_allocator())"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TRANSFORMER_ALLOCATOR")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["mimalloc"], run.stderr
    env["TRANSFORMER_ALLOCATOR"] = "system"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["system"], run.stderr
