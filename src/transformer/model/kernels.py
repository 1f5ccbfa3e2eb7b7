"""fp32 linear kernels on CPU: oneDNN (packed once for search, reordered per call in training) or MKL, chosen by timing.

PyTorch runs an fp32 ``nn.Linear`` on CPU through MKL's sgemm, which on one 2-core
AVX-512 machine we measured is 2.2-2.5x slower than oneDNN's kernel on a weight reordered ahead of time
into oneDNN's blocked layout (1350 x 256 -> 768: 2.47 against 1.05 ms; the 256 -> 8000
output projection: 36.8 against 22.4 ms). Search multiplies by the same weights thousands
of times, so packing a copy of the model (once per Translator, once per validation
during training) pays for itself at once.
Training changes the weights every step, so ``OneDNNLinear`` reorders them (and, for the
weight gradient, the activations) on every call and still comes out ahead (a 1.32x faster
fp32 training step for the Multi30k model); under bf16/fp16 autocast PyTorch already calls
oneDNN.
Which is faster depends on the CPU (on an AVX2-only EPYC the lead shrank to 1.02x of HF's
MKL step), so ``onednn_is_faster`` times both on each layer shape once per process and
``onednn_shapes`` picks, per model, the shapes that gain (``auto`` in the configs).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.hardware import best_seconds

log = logging.getLogger(__name__)


Shape = tuple[int, int, bool]  # (in_features, out_features, has bias)


def shape_of(linear: nn.Linear) -> Shape:
    return linear.in_features, linear.out_features, linear.bias is not None


def pack_weight(weight: Tensor) -> Tensor:
    """A linear layer's (out, in) weight reordered into oneDNN's blocked layout."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def linear_on_packed(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight.T + bias on oneDNN, ``packed`` being ``pack_weight(weight)``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def onednn_linear_once(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight.T + bias on oneDNN, the weight reordered for this one call."""
    return linear_on_packed(x, pack_weight(weight), bias)


class OneDNNLinearFunction(torch.autograd.Function):
    """A linear layer whose forward and both backward matmuls run on oneDNN."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_linear_once(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_linear_once(grad, weight.t().contiguous(), None)
        if ctx.needs_input_grad[1]:  # dW = grad^T x, as a linear layer with "weight" x^T
            grad_w = onednn_linear_once(rows.t().contiguous(), x.reshape(-1, x.shape[-1]).t().contiguous(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0)
        return grad_x, grad_w, grad_b


def onednn_usable() -> bool:
    """Whether this build and CPU run oneDNN's linear kernel at all."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        onednn_linear_once(torch.ones(2, 4), torch.ones(3, 4), None)
    except RuntimeError as e:
        log.debug("oneDNN linear unavailable (%s); using nn.Linear", e)
        return False
    return True


def onednn_is_faster(shape: Shape, rows: int, training: bool, threads: int) -> bool:
    """Time MKL (``F.linear``) against oneDNN on ``rows`` inputs of one layer shape: forward
    and backward with a per-call reorder for training, forward on a packed weight for search.
    ``threads`` is part of the cache key of the caller, since the answer depends on it."""
    n_in, n_out, has_bias = shape
    x = torch.randn(rows, n_in, requires_grad=training)
    w = (torch.randn(n_out, n_in) * n_in**-0.5).requires_grad_(training)
    b = torch.zeros(n_out, requires_grad=training) if has_bias else None
    if training:
        grad = torch.ones(rows, n_out)
        mkl = best_seconds(lambda: F.linear(x, w, b).backward(grad))
        onednn = best_seconds(lambda: OneDNNLinearFunction.apply(x, w, b).backward(grad))
    else:
        with torch.inference_mode():
            packed = pack_weight(w.detach())
            mkl = best_seconds(lambda: F.linear(x, w, b))
            onednn = best_seconds(lambda: linear_on_packed(x, packed, b))
    return onednn < mkl


def onednn_shapes(model: nn.Module, rows: int, training: bool) -> set[Shape]:
    """The linear shapes of ``model`` that run faster on oneDNN here (empty where oneDNN
    cannot run), timed and logged once per process."""
    shapes = tuple(sorted({shape_of(m) for m in model.modules() if isinstance(m, nn.Linear)}))
    if not shapes or not onednn_usable():
        return set()
    return set(_faster_on_onednn(shapes, rows, training, torch.get_num_threads()))


@functools.cache
def _faster_on_onednn(shapes: tuple[Shape, ...], rows: int, training: bool, threads: int) -> frozenset[Shape]:
    chosen = frozenset(s for s in shapes if onednn_is_faster(s, rows, training, threads))
    log.info(
        "%s linear kernels, timed on %d rows: oneDNN for %s; MKL for %s",
        "training" if training else "search",
        rows,
        ", ".join(f"{i}->{o}" for i, o, _ in sorted(chosen)) or "none",
        ", ".join(f"{i}->{o}" for i, o, b in shapes if (i, o, b) not in chosen) or "none",
    )
    return chosen
