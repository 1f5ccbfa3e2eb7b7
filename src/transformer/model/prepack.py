"""Search on oneDNN-packed weights: a copy of the model whose linear layers multiply by
weights reordered once into oneDNN's blocked layout (kernels.py says why and when)."""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn

from transformer.model.kernels import Shape, linear_on_packed, pack_weight, shape_of

log = logging.getLogger(__name__)


class PackedLinear(nn.Module):
    """``nn.Linear``'s forward on a oneDNN-packed copy of its weight (inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = pack_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        return linear_on_packed(x, self.weight, self.bias)


def packed_for_cpu(model: nn.Module, shapes: set[Shape] | None = None) -> nn.Module:
    """A copy of ``model`` whose linear layers (those of ``shapes``, or all) are
    ``PackedLinear``s; ``model`` itself is untouched. A model that is already packed, that
    has nothing to pack, or that oneDNN cannot pack (no oneDNN build, an unsupported CPU),
    is returned as it is."""
    if (
        not torch.backends.mkldnn.is_available()
        or any(isinstance(m, PackedLinear) for m in model.modules())
        or shapes == set()
    ):
        return model
    packed = copy.deepcopy(model)
    try:
        for parent in list(packed.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear) and (shapes is None or shape_of(child) in shapes):
                    setattr(parent, name, PackedLinear(child))
    except RuntimeError as e:
        log.debug("oneDNN weight packing unavailable (%s); decoding with nn.Linear", e)
        return model
    return packed
