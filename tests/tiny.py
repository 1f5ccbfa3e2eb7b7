"""Tiny untrained models, their tokenizer and id batches, shared by the tests of every layer."""

from __future__ import annotations

import torch

from transformer.config import ModelConfig
from transformer.data.builtin import generate_pairs
from transformer.data.tokenizer import Tokenizer, build_tokenizer
from transformer.model import Transformer, build_model
from transformer.vocab import EOS, PAD

VOCAB = 24


def tiny_config(vocab: int = VOCAB, **overrides) -> ModelConfig:
    """The tests' one tiny shape (2+2 layers of width 32, no dropout); ``overrides`` change any key."""
    base = dict(d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=64, dropout=0.0, max_positions=64)
    return ModelConfig(**{**base, "src_vocab_size": vocab, "tgt_vocab_size": vocab, **overrides})


def tiny_model(norm_first: bool = False, seed: int = 0, vocab: int = VOCAB, **overrides) -> Transformer:
    """A 2+2-layer model in eval mode; pre-norm uses fairseq positions (what M2M100 exports)."""
    torch.manual_seed(seed)
    positional = "sinusoidal_fairseq" if norm_first else "sinusoidal"
    return build_model(tiny_config(vocab, **{"norm_first": norm_first, "positional": positional, **overrides})).eval()


def eos_prone(model: Transformer, boost: float) -> Transformer:
    """Raise every EOS logit by about ``boost`` (through the bias of the last LayerNorm, so the
    model stays an ordinary Transformer that exports exactly): random models then finish their
    hypotheses after a few tokens instead of running into the length limit."""
    norm = model.decoder_norm if model.cfg.norm_first else model.decoder[-1].ffn_sub.norm
    eos_row = model.output.weight[EOS]
    with torch.no_grad():
        norm.bias.copy_(boost * eos_row / eos_row.norm() ** 2)
    return model


def random_sources(lengths: list[int], vocab: int = VOCAB, seed: int = 1) -> list[list[int]]:
    """Source id lists (ordinary pieces, then EOS) of the given lengths including EOS."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(EOS + 1, vocab, (n - 1,), generator=g).tolist() + [EOS] for n in lengths]


def padded(seqs: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(seqs), max(map(len, seqs))), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out


def tiny_tokenizer(vocab_size: int = 60) -> Tokenizer:
    """A joint BPE over a slice of the built-in corpus (a second to train)."""
    return build_tokenizer(generate_pairs(300, seed=7), vocab_size, joint=True, max_sentences=300)
