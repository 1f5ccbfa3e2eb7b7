"""Device choice and process-wide settings shared by training and decoding: the device and
autocast (the memory allocator is ``allocator``'s)."""

from __future__ import annotations

import contextlib

import torch

from transformer.errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else is checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but CUDA is not available on this machine (use device=cpu or auto)")
    return device


def autocast(device: torch.device, precision: str, key: str = "trainer.precision"):
    """bf16 autocast on CPU and CUDA, fp16 on CUDA; fp32 weights either way. ``key`` names
    the setting in errors."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise UserError(f"{key}=fp16 needs CUDA; use bf16 on CPU")
    if precision not in ("bf16", "fp16"):
        raise UserError(f"{key}={precision!r}: expected fp32, bf16 or fp16")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
