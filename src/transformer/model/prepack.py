"""fp32 search on CPU with every linear layer's weight packed once for oneDNN.

PyTorch runs an fp32 ``nn.Linear`` on CPU through MKL's sgemm, which on the 2-core AMD EPYC
we measure on is 2.2-2.5x slower than oneDNN's kernel on a weight reordered ahead of time
into oneDNN's blocked layout (1350 x 256 -> 768: 2.47 against 1.05 ms; the 256 -> 8000
output projection: 36.8 against 22.4 ms). Search multiplies by the same weights thousands
of times, so packing a copy of the model (once per Translator, once per validation
during training) pays for itself at once.
Training keeps ``nn.Linear`` (its weights change every step), and under bf16/fp16
autocast PyTorch already calls oneDNN.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class PackedLinear(nn.Module):
    """``nn.Linear``'s forward on a oneDNN-packed copy of its weight (inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def packed_for_cpu(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose linear layers are ``PackedLinear``s; ``model`` itself is
    untouched. A model that is already packed, or that oneDNN cannot pack (no oneDNN
    build, an unsupported CPU), is returned as it is."""
    if not torch.backends.mkldnn.is_available() or any(isinstance(m, PackedLinear) for m in model.modules()):
        return model
    packed = copy.deepcopy(model)
    try:
        for parent in list(packed.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    setattr(parent, name, PackedLinear(child))
    except RuntimeError as e:
        log.debug("oneDNN weight packing unavailable (%s); decoding with nn.Linear", e)
        return model
    return packed
