"""The decoder's state between search steps, as typed fields instead of dictionary keys
shared by the model, the attention layers and search's scorer."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class LayerCache:
    """One decoder layer's self-attention keys and values (N0, H, t, Dh) so far. ``index``
    (N,) is a reordering not applied yet: the rows of k and v that the next append keeps
    (``attention.extend`` does both in one copy)."""

    k: Tensor | None = None
    v: Tensor | None = None
    index: Tensor | None = None

    def reordered(self, index: Tensor) -> LayerCache:
        """This cache's rows at ``index``, left for the next append to apply."""
        if self.k is None:
            return LayerCache()
        pending = index if self.index is None else self.index[index]
        return LayerCache(self.k, self.v, pending)


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
