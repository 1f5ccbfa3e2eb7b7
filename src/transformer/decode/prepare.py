"""The models a search runs on: ``auto`` settled for the device (precision, int8, prepacking),
then int8 copies, oneDNN-packed copies, or the models themselves. ``Translator`` builds them
once per setting; ``scripts/bench_decode.py`` calls the same functions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from transformer.config import DecodeConfig
from transformer.decode.fast import resolve_quantize
from transformer.hardware import resolve_precision
from transformer.model import Transformer
from transformer.model.kernels import onednn_shapes
from transformer.model.prepack import packed_for_cpu
from transformer.model.quantize import quantized_for_cpu


def resolve_decode(cfg: DecodeConfig, device: torch.device, model: Transformer | None = None) -> DecodeConfig:
    """``cfg`` with ``auto`` settled for this device: precision (bf16 where native), quantize
    (``fast.resolve_quantize``, timed on ``model``; int8 computes the rest in fp32) and prepack
    (``true``/``false``, or ``auto`` kept for a per-shape timing in ``pack_models``)."""
    int8 = cfg.quantize == "int8" and cfg.precision == "auto"
    precision = "fp32" if int8 else resolve_precision(cfg.precision, device, "decode.precision")
    cfg = replace(cfg, precision=precision)
    quantize = resolve_quantize(cfg, device, model) if model is not None or cfg.quantize != "auto" else "none"
    return replace(cfg, quantize=quantize, precision="fp32" if quantize == "int8" else precision)


def packs_weights(cfg: DecodeConfig, device: torch.device) -> bool:
    """Whether fp32 search on this device may run on oneDNN-packed weights (``cfg`` resolved)."""
    return cfg.prepack != "false" and device.type == "cpu" and cfg.precision == "fp32" and cfg.quantize != "int8"


def pack_models(models: Sequence[Transformer], cfg: DecodeConfig) -> list[Transformer]:
    """Copies of ``models`` with linear weights packed for oneDNN: all of them
    (``prepack=true``) or the layer shapes that time faster on oneDNN here (``auto``)."""
    return [
        packed_for_cpu(m, None if cfg.prepack == "true" else onednn_shapes(m, rows=256, training=False)) for m in models
    ]


def prepare_models(models: Sequence[Transformer], cfg: DecodeConfig, device: torch.device) -> list[Transformer]:
    """The models search runs on under ``cfg`` (resolved): int8 copies, packed copies, or themselves."""
    if cfg.quantize == "int8":
        return [quantized_for_cpu(m) for m in models]
    if packs_weights(cfg, device):
        return pack_models(models, cfg)
    return list(models)
