"""The encoder-decoder Transformer: masks, attention, layers and the full model."""

from transformer.model.transformer import Transformer, build_model

__all__ = ["Transformer", "build_model"]
