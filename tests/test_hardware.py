"""Hardware-aware defaults: precision auto and the timed kernel choice (the time budget: test_budget.py)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import compose_config
from tiny import tiny_config
from training import train_quietly
from transformer import hardware
from transformer.config import setting
from transformer.errors import UserError
from transformer.hardware import Hardware, read_cpu_flags, resolve_precision
from transformer.model import build_model
from transformer.model.kernels import onednn_shapes, shape_of
from transformer.model.onednn_linear import train_linears_on_onednn
from transformer.model.prepack import packed_for_cpu

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


@pytest.mark.slow
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
    return build_model(tiny_config(300, n_encoder_layers=1, n_decoder_layers=1, max_positions=1024))


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
    from transformer.allocator import allocator_env

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


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_use_fast_allocator_reruns_the_process_under_mimalloc() -> None:
    from transformer.allocator import mimalloc_library

    if mimalloc_library() is None:
        pytest.skip("cmeel-mimalloc is not installed")
    code = "from transformer.allocator import use_fast_allocator, active_allocator; use_fast_allocator(); print(active_allocator())"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TRANSFORMER_ALLOCATOR")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["mimalloc"], run.stderr
    env["TRANSFORMER_ALLOCATOR"] = "system"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["system"], run.stderr
