"""The fast decoding paths and the ``auto`` choice among them: int8 linear layers
(``decode.quantize``), a vocabulary shortlist (``decode.shortlist``) and the output layer
restricted to a batch's candidates.

``auto`` picks only exact paths unless ``decode.max_bleu_loss`` allows a cost: int8 then
when the loss bound our tests hold it to (``INT8_BLEU_LOSS``) is within it and its linear
layers time faster here than the exact ones (timed once per process and model shape, as
``prepack: auto`` does); the shortlist beside the checkpoint when the BLEU loss
``transformer-shortlist`` measured on the validation split is within it. The choice is
logged in one line.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.config import DecodeConfig
from transformer.decode.shortlist import Shortlist, beside, load_shortlist
from transformer.errors import UserError
from transformer.hardware import best_seconds
from transformer.model.kernels import shape_of
from transformer.model.quantize import Int8Linear, int8_available

log = logging.getLogger(__name__)

INT8_BLEU_LOSS = 0.3  # the BLEU int8 search may lose against fp32 (tests/decode/test_fast_decode.py holds it to this)


def resolve_quantize(cfg: DecodeConfig, device: torch.device, model: nn.Module) -> str:
    """``none`` or ``int8`` for ``cfg.quantize`` (``cfg.precision`` already resolved)."""
    quantize = cfg.quantize
    if quantize == "int8" and (device.type != "cpu" or cfg.precision != "fp32"):
        raise UserError(
            f"decode.quantize=int8 runs on CPU in fp32 (here: device {device.type}, decode.precision={cfg.precision})"
        )
    if quantize != "auto":
        return quantize
    if device.type != "cpu" or cfg.max_bleu_loss < INT8_BLEU_LOSS or not int8_available():
        return "none"
    shapes = tuple(sorted({shape_of(m) for m in model.modules() if isinstance(m, nn.Linear)}))
    return "int8" if _int8_faster(shapes, cfg.precision, torch.get_num_threads()) else "none"


@functools.cache
def _int8_faster(shapes: tuple[tuple[int, int, bool], ...], precision: str, threads: int, rows: int = 64) -> bool:
    """Whether the model's linear layers, on ``rows`` decoder rows, take less time in int8
    than in ``precision`` here (``threads``: part of the cache key)."""
    exact = int8 = 0.0
    with torch.inference_mode():
        for n_in, n_out, has_bias in shapes:
            layer = nn.Linear(n_in, n_out, bias=has_bias)
            x = torch.randn(rows, n_in)
            quantized = Int8Linear(layer)
            with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                exact += best_seconds(functools.partial(layer, x))
            int8 += best_seconds(functools.partial(quantized, x))
    log.info(
        "decode.quantize=auto: linear layers take %.2f ms in int8, %.2f ms in %s", 1e3 * int8, 1e3 * exact, precision
    )
    return int8 < exact


def resolve_shortlist(cfg: DecodeConfig, checkpoint: str | Path | None, tgt_vocab_size: int) -> Shortlist | None:
    """The shortlist ``cfg.shortlist`` names: none, a file, or (auto) the one beside
    ``checkpoint`` when decode.max_bleu_loss > 0 covers its measured BLEU loss."""
    if cfg.shortlist == "none":
        return None
    if cfg.shortlist != "auto":
        return _load(str(cfg.shortlist), tgt_vocab_size)
    if checkpoint is None or cfg.max_bleu_loss <= 0 or not beside(checkpoint).is_file():
        return None
    shortlist = _load(str(beside(checkpoint)), tgt_vocab_size)
    if shortlist.bleu_loss is None or shortlist.bleu_loss > cfg.max_bleu_loss:
        return None
    return shortlist


def _load(path: str, tgt_vocab_size: int) -> Shortlist:
    """The shortlist at ``path``, read once per version of the file (its time and size)."""
    stat = Path(path).stat() if Path(path).is_file() else None
    return _load_version(path, tgt_vocab_size, stat and (stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _load_version(path: str, tgt_vocab_size: int, version: tuple[int, int] | None) -> Shortlist:
    return load_shortlist(path, tgt_vocab_size)


@functools.cache
def log_choice(precision: str, quantize: str, shortlist: str) -> None:
    """One line per process and choice: what the search runs on."""
    log.info("search in %s, linear layers %s, %s", precision, "int8" if quantize == "int8" else precision, shortlist)


def output_rows(layer: nn.Module, index: Tensor) -> nn.Module:
    """The output projection ``layer`` restricted to the target ids ``index`` (K,): its rows
    sliced (and packed or quantized again) once per batch."""
    if hasattr(layer, "rows"):
        return layer.rows(index)
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"cannot restrict a {type(layer).__name__} to a shortlist")
    return _Rows(layer.weight[index], None if layer.bias is None else layer.bias[index])


class _Rows(nn.Module):
    """A linear layer on given weight rows."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def required_tokens(
    eos: int, forced_bos: int, prefixes: Sequence[list[int]] | None, constraints: Sequence[list[list[int]]] | None
) -> set[int]:
    """Target ids a shortlisted batch must keep whatever the table says: EOS, a forced first
    token, and every token of its forced prefixes and constraint phrases."""
    ids = {eos} | ({forced_bos} if forced_bos >= 0 else set())
    ids.update(t for prefix in prefixes or [] for t in prefix)
    ids.update(t for phrases in constraints or [] for phrase in phrases for t in phrase)
    return ids
