"""The decoder's state between search steps, as typed fields instead of dictionary keys
shared by the model, the attention layers and search's scorer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class LayerCache:
    """One decoder layer's self-attention keys and values: buffers (N0, H, capacity, Dh) whose
    first ``length`` positions are filled. ``index`` (N,) is a reordering not applied yet: the
    rows the next append keeps. An append with no reordering pending writes the new positions
    in place (greedy steps: no copy of the past); one after a reordering (beams) copies the
    kept rows once into new buffers, with as much room again to grow."""

    k: Tensor | None = None
    v: Tensor | None = None
    length: int = 0
    index: Tensor | None = None

    def reordered(self, index: Tensor) -> LayerCache:
        """This cache's rows at ``index``, left for the next append to apply (the buffers are
        shared until then: an append to a cache with a reordering pending never writes in place)."""
        if self.k is None:
            return LayerCache()
        pending = index if self.index is None else self.index[index]
        return LayerCache(self.k, self.v, self.length, pending)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add the newest positions' keys and values (N, H, T, Dh); every position's so far (views)."""
        t, end = self.length, self.length + k.size(2)
        if self.k is None or self.v is None or self.index is not None or end > self.k.size(2):
            self.k, self.v = grown(self.k, k, t, self.index, 2 * end), grown(self.v, v, t, self.index, 2 * end)
            self.index = None
        self.k[:, :, t:end] = k
        self.v[:, :, t:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def grown(past: Tensor | None, new: Tensor, length: int, index: Tensor | None, capacity: int) -> Tensor:
    """A buffer (N, H, capacity, Dh) shaped as ``new`` (N, H, T, Dh) holding the first ``length``
    positions of ``past`` (at rows ``index`` if given): one copy, the reordering included."""
    n, h, _, dh = new.shape
    out = new.new_empty(n, h, capacity, dh)
    if past is not None and length:
        if index is None:
            out[:, :, :length] = past[:, :, :length]
        else:
            torch.index_select(past[:, :, :length], 0, index, out=out[:, :, :length])
    return out


@dataclass
class DecoderCache:
    """Step-by-step decoding state (``Transformer.start_cache`` builds it).

    memory_kv: each layer's cross-attention K, V (B, H, S, Dh), one row per sentence.
    layers: each layer's self-attention cache. mask: (B, 1, 1, S) real source tokens.
    groups: decoder rows per memory row (the beams of a sentence, contiguous). pos: the
    position of the next token. align_layer: a decoder layer (negative counts from the
    end) whose cross-attention ``decode_step`` keeps, averaged over heads, in
    ``alignment`` (N, S) for the newest position; None (the default) computes nothing."""

    memory_kv: list[tuple[Tensor, Tensor]]
    layers: list[LayerCache]
    mask: Tensor
    groups: int = 1
    pos: int = 0
    align_layer: int | None = None
    alignment: Tensor | None = field(default=None, repr=False)
