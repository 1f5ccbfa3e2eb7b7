"""Device choice and process-wide settings shared by training and decoding."""

from __future__ import annotations

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
