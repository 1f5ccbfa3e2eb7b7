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
    """``nn.Linear``'s forward on a oneDNN-packed copy of its weight (inference only).
    ``keep_source``: also keep the plain weight, so ``rows`` can pack a slice of it (the output
    projection under a vocabulary shortlist)."""

    def __init__(self, linear: nn.Linear, keep_source: bool = False):
        super().__init__()
        self.weight = pack_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.source = linear.weight.detach() if keep_source else None

    def forward(self, x: Tensor) -> Tensor:
        return linear_on_packed(x, self.weight, self.bias)

    def rows(self, index: Tensor) -> nn.Module:
        """This layer restricted to the output rows ``index``, packed anew."""
        if self.source is None:
            raise ValueError("a PackedLinear made without keep_source cannot be sliced")
        part = nn.Linear(self.source.size(1), index.numel(), bias=self.bias is not None, device="meta")
        part.weight = nn.Parameter(self.source[index], requires_grad=False)
        part.bias = None if self.bias is None else nn.Parameter(self.bias[index], requires_grad=False)
        return PackedLinear(part)


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
                    setattr(parent, name, PackedLinear(child, keep_source=parent is packed and name == "output"))
    except RuntimeError as e:
        log.debug("oneDNN weight packing unavailable (%s); decoding with nn.Linear", e)
        return model
    return packed
