"""int8 search (``decode.quantize=int8``): a copy of the model whose linear layers multiply
int8 activations by int8 weights on oneDNN's quantized linear kernel.

Weights are quantized once, per output channel (scale = max |w| / 127, symmetric), and
reordered into oneDNN's blocked layout; activations are quantized at every call, per token
(scale = max |x| / 127, symmetric), and carried to oneDNN as unsigned bytes around a zero
point of 128, so one kernel call serves every row; the per-token scales are applied to
its fp32 output, then the bias. This is CTranslate2's int8 scheme, through the operators
PyTorch's own x86 quantization lowers to (``torch.ops.onednn.qlinear_prepack`` and
``qlinear_pointwise``), not the deprecated ``torch.ao.quantization.quantize_dynamic``.

CPUs without VNNI (AVX2, AVX-512 without VNNI) multiply bytes with ``vpmaddubsw``, whose
16-bit sums of two products saturate at full 8-bit range; there the weights keep 7 bits
(the way fbgemm's ``reduce_range`` handles it). ``vnni_exact`` finds out which case holds by
running the kernel once on values that would saturate, so ISA caps set by the user count too.
"""

from __future__ import annotations

import copy
import functools
import logging

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

ZERO_POINT = 128  # activations: int8 in [-127, 127] shifted to uint8 for oneDNN's u8 x s8 kernel


def int8_available() -> bool:
    """Whether this build runs oneDNN's quantized linear kernel."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def quantize_weight(weight: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """(out, in) fp32 weight -> int8 weight in [-levels, levels] and its per-row fp32 scales (out,)."""
    scale = (weight.detach().float().abs().amax(dim=1) / levels).clamp_min(1e-12)
    q = torch.round(weight.detach().float() / scale[:, None]).clamp_(-levels, levels).to(torch.int8)
    return q, scale


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(M, K) fp32 activations -> uint8 (value + 128, value in [-127, 127]) and per-row scales (M, 1)."""
    scale = (x.abs().amax(dim=1, keepdim=True) / 127).clamp_min_(1e-12)
    return torch.round(x / scale).add_(ZERO_POINT).to(torch.uint8), scale


def _int8_matmul(xq: Tensor, packed: Tensor, w_scale: Tensor, w_zero: Tensor) -> Tensor:
    """sum_k (xq - 128) * wq * w_scale on oneDNN, in fp32 (M, out)."""
    return torch.ops.onednn.qlinear_pointwise(
        xq, 1.0, ZERO_POINT, packed, w_scale, w_zero, None, 1.0, 0, torch.float32, "none", [], ""
    )


@functools.cache
def vnni_exact() -> bool:
    """Whether the kernel multiplies full-range bytes exactly here (VNNI/AMX), tried once per process."""
    n = 64
    xq = torch.full((1, n), 255, dtype=torch.uint8)  # +127 after the zero point
    wq = torch.full((1, n), 127, dtype=torch.int8)
    out = _int8_matmul(xq, torch.ops.onednn.qlinear_prepack(wq, None), torch.ones(1), torch.zeros(1, dtype=torch.long))
    exact = float(out) == 127.0 * 127.0 * n
    log.debug("oneDNN int8 linear: %s", "full 8-bit weights" if exact else "7-bit weights (no VNNI)")
    return exact


class Int8Linear(nn.Module):
    """``nn.Linear``'s forward, int8 x int8 on oneDNN (inference only; fp32 in, fp32 out)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_weight(linear.weight, 127 if vnni_exact() else 63)
        self.set_weight(q, scale, None if linear.bias is None else linear.bias.detach().float())

    def set_weight(self, q: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        """Hold the int8 weight (out, in), packed for oneDNN, its per-row scales and the bias."""
        self.out_features, self.in_features = q.shape
        self.q, self.scale, self.bias = q, scale, bias
        self.weight = torch.ops.onednn.qlinear_prepack(q, None)
        self.zero = torch.zeros(self.out_features, dtype=torch.long)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).float()
        xq, x_scale = quantize_rows(rows)
        out = _int8_matmul(xq, self.weight, self.scale, self.zero).mul_(x_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def rows(self, index: Tensor) -> Int8Linear:
        """This layer restricted to the output rows ``index`` (a vocabulary shortlist), packed anew."""
        part = Int8Linear.__new__(Int8Linear)
        nn.Module.__init__(part)
        part.set_weight(self.q[index], self.scale[index], None if self.bias is None else self.bias[index])
        return part


def quantized_for_cpu(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``nn.Linear``s are ``Int8Linear``s (the output projection
    too); ``model`` itself is untouched, and a model already quantized is returned. Without the kernel, ``model`` is returned as it is,
    with one warning."""
    if not int8_available():
        log.warning("decode.quantize=int8: this PyTorch build has no oneDNN int8 linear kernel; decoding in fp32")
        return model
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        return model
    quantized = copy.deepcopy(model)
    for parent in list(quantized.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return quantized
