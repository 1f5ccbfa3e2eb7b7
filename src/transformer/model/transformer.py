"""The encoder-decoder Transformer, readable top to bottom.

    src ids -> scaled embedding + positions -> encoder layers -> memory
    tgt ids -> scaled embedding + positions -> decoder layers (causal self, cross, FFN) -> logits

(With model.positional=rope nothing is added to the embeddings: self-attention rotates its
queries and keys by their positions instead.)

``encode`` and ``decode`` are separate so search can encode once and decode step by step
with a key/value cache (``start_cache`` / ``select_cache``, a ``cache.DecoderCache``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.config import ModelConfig, validate_section
from transformer.errors import UserError
from transformer.model.attention import CrossAttention, SelfAttention, rotary_table
from transformer.model.cache import DecoderCache, LayerCache
from transformer.vocab import PAD, Specials

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}  # config.Activation; silu: OPUS-MT's swish
GATED = {"swiglu": F.silu, "geglu": F.gelu}  # the gated feed-forward activations (Shazeer 2020)


def sinusoid_table(n_positions: int, d_model: int, style: str = "sinusoidal", pad_id: int = PAD) -> Tensor:
    """Fixed positional encodings (n_positions, d_model): sines in the first half, cosines in
    the second. ``sinusoidal``: the paper's frequencies 10000^(-2i/d) for positions 0, 1, ...
    (as Marian lays them out); ``sinusoidal_fairseq``: fairseq's 10000^(-i/(d/2-1)) for
    positions pad_id + 1, pad_id + 2, ... (as M2M100 does), so exported models match exactly."""
    half = d_model // 2
    if style == "sinusoidal":
        freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) * 2 / d_model)
        positions = torch.arange(n_positions, dtype=torch.float64)
    else:
        freqs = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000.0) / (half - 1)))
        positions = torch.arange(pad_id + 1, pad_id + 1 + n_positions, dtype=torch.float64)
    angles = positions[:, None] * freqs[None, :]
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, :half] = torch.sin(angles)
    table[:, half : 2 * half] = torch.cos(angles)
    return table.float()


def padding_mask(ids: Tensor, pad_id: int = PAD) -> Tensor:
    """(B, S) ids -> (B, 1, 1, S) bool, True where a key is a real token."""
    return (ids != pad_id)[:, None, None, :]


class Dropout(nn.Module):
    """Inverted dropout. On CPU the random numbers dominate (``nn.Dropout``'s Bernoulli
    sampler took a third of a training step): one 64-bit draw gives four 15-bit uniform
    integers, so the mask costs a quarter of the generator calls of ``torch.rand``
    (0.9 against 2.4 ms per million values). p is rounded to a multiple of 2^-15.
    On GPUs, and under torch.compile (whose graphs cannot hold ``random_``), the fused
    kernel is used. ``whole_vectors`` drops along the last dimension together (one draw per
    token: word dropout)."""

    def __init__(self, p: float, whole_vectors: bool = False):
        super().__init__()
        self.p = p
        self.whole_vectors = whole_vectors
        self.threshold = round(p * 2**15)  # drop when the 15-bit draw is below this
        self.scale = 2**15 / (2**15 - self.threshold) if self.threshold < 2**15 else 0.0

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        shape = (*x.shape[:-1], 1) if self.whole_vectors else x.shape
        if x.is_cuda or torch.compiler.is_compiling():
            return (
                x * F.dropout(x.new_ones(shape), self.p, training=True) if self.whole_vectors else F.dropout(x, self.p)
            )
        numel = math.prod(shape)
        bits = torch.empty((numel + 3) // 4, dtype=torch.int64, device=x.device).random_()  # [0, 2^63)
        draws = bits.view(torch.int16)[:numel].view(shape) & 0x7FFF  # uniform on [0, 2^15)
        return x * (draws >= self.threshold) * self.scale


class Embedding(nn.Module):
    """Token embedding scaled by sqrt(d_model), plus positions, then dropout. Word dropout
    zeroes whole token vectors (positions stay): small corpora overfit on word identities."""

    def __init__(
        self, vocab_size: int, cfg: ModelConfig, tokens: nn.Embedding | None = None, word_dropout: float = 0.0
    ):
        super().__init__()
        self.tokens = tokens if tokens is not None else nn.Embedding(vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.max_positions = cfg.max_positions
        self.positions = nn.Embedding(cfg.max_positions, cfg.d_model) if cfg.positional == "learned" else None
        table = None  # learned, or rope: self-attention turns queries and keys instead
        if cfg.positional in ("sinusoidal", "sinusoidal_fairseq"):
            table = sinusoid_table(cfg.max_positions, cfg.d_model, cfg.positional, cfg.pad_id)
        self.register_buffer("table", table, persistent=False)
        self.dropout = Dropout(cfg.dropout)
        self.word_dropout = Dropout(word_dropout, whole_vectors=True)

    def forward(self, ids: Tensor, start: int = 0) -> Tensor:
        """ids (B, T) at positions start..start+T-1 -> (B, T, D)."""
        end = start + ids.size(1)
        if end > self.max_positions:
            raise UserError(
                f"sequence of {end} subwords exceeds model.max_positions={self.max_positions}; "
                "shorten the input or train with a larger model.max_positions"
            )
        x = self.word_dropout(self.tokens(ids) * self.scale)
        if self.positions is not None:
            x = x + self.positions.weight[start:end].to(self.tokens.weight.dtype)
        elif self.table is not None:
            x = x + self.table[start:end].to(self.tokens.weight.dtype)
        return self.dropout(x)


class FeedForward(nn.Module):
    """fc2(act(fc1 x)); gated (swiglu, geglu): fc2(act(fc1 x) * gate x), gate as wide as fc1."""

    def __init__(self, cfg: ModelConfig, width: int):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, width)
        self.fc2 = nn.Linear(width, cfg.d_model)
        self.gate = nn.Linear(cfg.d_model, width) if cfg.activation in GATED else None
        self.activation = GATED[cfg.activation] if self.gate is not None else ACTIVATIONS[cfg.activation]
        self.dropout = Dropout(cfg.activation_dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.activation(self.fc1(x))
        if self.gate is not None:
            h = h * self.gate(x)
        return self.fc2(self.dropout(h))


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang and Sennrich 2019): LayerNorm without the
    mean and the bias; eps as LayerNorm's. Computed in fp32, returned in x's dtype."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        y = x.float()
        return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The normalisation of model.norm, d_model wide."""
    return RMSNorm(cfg.d_model) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.d_model)


class Sublayer(nn.Module):
    """Residual connection around one block, with the norm before it (pre-norm) or after
    the sum (post-norm, as in the paper)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = make_norm(cfg)
        self.dropout = Dropout(cfg.dropout)
        self.norm_first = cfg.norm_first

    def forward(self, x: Tensor, block) -> Tensor:
        if self.norm_first:
            return x + self.dropout(block(self.norm(x)))
        return self.norm(x + self.dropout(block(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout, causal=False)
        self.ffn = FeedForward(cfg, cfg.d_ff)
        self.attn_sub = Sublayer(cfg)
        self.ffn_sub = Sublayer(cfg)

    def forward(self, x: Tensor, mask: Tensor, rotary: Tensor | None = None) -> Tensor:
        x = self.attn_sub(x, lambda h: self.self_attn(h, mask, rotary=rotary))
        return self.ffn_sub(x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout, causal=True)
        self.cross_attn = CrossAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.ffn = FeedForward(cfg, cfg.decoder_d_ff or cfg.d_ff)
        self.self_sub = Sublayer(cfg)
        self.cross_sub = Sublayer(cfg)
        self.ffn_sub = Sublayer(cfg)

    def forward(
        self,
        x: Tensor,
        kv: tuple[Tensor, Tensor],
        src_mask: Tensor,
        cache: LayerCache | None = None,
        groups: int = 1,
        need_weights: bool = False,
        rotary: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, T, D) -> (B, T, D); ``need_weights``: and the cross-attention probabilities
        (B, H, T, S), which leave the output unchanged (attention pictures, alignments).
        ``rotary``: x's rows of the rotary table (model.positional=rope)."""
        weights = []

        def cross(h: Tensor) -> Tensor:
            if not need_weights:
                return self.cross_attn(h, kv, src_mask, groups=groups)
            out, w = self.cross_attn(h, kv, src_mask, need_weights=True, groups=groups)
            weights.append(w)
            return out

        x = self.self_sub(x, lambda h: self.self_attn(h, cache=cache, rotary=rotary))
        x = self.ffn_sub(self.cross_sub(x, cross), self.ffn)
        return (x, weights[0]) if need_weights else x


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_section("model", cfg)
        if cfg.share_embeddings and cfg.src_vocab_size != cfg.tgt_vocab_size:
            raise UserError("model.share_embeddings=true needs one joint vocabulary (data.joint_vocab=true)")
        self.cfg = cfg
        self.specials = Specials(cfg.pad_id, cfg.bos_id, cfg.eos_id, cfg.forced_bos_id)
        self.tgt_embed = Embedding(cfg.tgt_vocab_size, cfg, word_dropout=cfg.tgt_word_dropout)
        shared = self.tgt_embed.tokens if cfg.share_embeddings else None
        self.src_embed = Embedding(cfg.src_vocab_size, cfg, tokens=shared, word_dropout=cfg.src_word_dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        # Pre-norm stacks end with a norm; post-norm layers are already normalised.
        self.encoder_norm = make_norm(cfg) if cfg.norm_first else nn.Identity()
        self.decoder_norm = make_norm(cfg) if cfg.norm_first else nn.Identity()
        rotary = rotary_table(cfg.max_positions, cfg.d_model // cfg.n_heads) if cfg.positional == "rope" else None
        self.register_buffer("rotary", rotary, persistent=False)  # (2, max_positions, Dh)
        self.output = nn.Linear(cfg.d_model, cfg.tgt_vocab_size, bias=cfg.final_logits_bias)
        self.reset_parameters()
        if cfg.tie_output:
            self.output.weight = self.tgt_embed.tokens.weight

    def reset_parameters(self) -> None:
        """Xavier-uniform matrices, zero biases, N(0, d^-1/2) embeddings with a zero PAD row;
        deterministic under ``torch.manual_seed``."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.d_model**-0.5)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()

    def rotary_rows(self, start: int, length: int) -> Tensor | None:
        """The rotary table (2, length, Dh) of positions start.. (model.positional=rope), else None."""
        return None if self.rotary is None else self.rotary[:, start : start + length]

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) -> memory (B, S, D) and its key mask (B, 1, 1, S)."""
        mask = padding_mask(src, self.cfg.pad_id)
        x = self.src_embed(src)
        rotary = self.rotary_rows(0, src.size(1))
        for layer in self.encoder:
            x = layer(x, mask, rotary)
        return self.encoder_norm(x), mask

    def decode(self, tgt: Tensor, memory: Tensor, src_mask: Tensor) -> Tensor:
        """Teacher-forced decoder: tgt (B, T) starting with BOS -> hidden states (B, T, D).
        Right padding needs no target mask: the causal mask already hides later positions."""
        x = self.tgt_embed(tgt)
        rotary = self.rotary_rows(0, tgt.size(1))
        for layer in self.decoder:
            x = layer(x, layer.cross_attn.memory_kv(memory), src_mask, rotary=rotary)
        return self.decoder_norm(x)

    def forward(self, src: Tensor, tgt: Tensor, keep: Tensor | None = None) -> Tensor:
        """Logits (B, T, V) for every target position, or (M, V) for the M positions where
        ``keep`` (B, T) is True, or at ``keep`` (M,), indices into the flattened (B * T)
        positions (``Batch.positions``: found on the host, so a GPU never waits to learn M):
        training skips the output projection on padding."""
        memory, mask = self.encode(src)
        hidden = self.decode(tgt, memory, mask)
        return self.output(hidden if keep is None else hidden.flatten(0, 1)[keep.flatten()])

    # Incremental decoding -------------------------------------------------------------

    def start_cache(self, memory: Tensor, src_mask: Tensor, align_layer: int | None = None) -> DecoderCache:
        """Decoder state for step-by-step search: cross-attention K/V computed once per
        sentence, an empty self-attention cache per layer. ``align_layer`` (negative counts
        from the end): ``decode_step`` also keeps that layer's cross-attention, averaged
        over heads, in ``cache.alignment`` (N, S); None computes nothing extra."""
        n_layers = len(self.decoder)
        if align_layer is not None and not -n_layers <= align_layer < n_layers:
            raise UserError(f"alignment layer {align_layer}: the model has {n_layers} decoder layers")
        return DecoderCache(
            # contiguous once here: a view of the fused K/V projection cannot be batched by
            # matmul without a copy, which every step then made again (greedy: ~7% of its time)
            memory_kv=[tuple(t.contiguous() for t in layer.cross_attn.memory_kv(memory)) for layer in self.decoder],
            layers=[LayerCache() for _ in self.decoder],
            mask=src_mask,
            align_layer=None if align_layer is None else align_layer % n_layers,
        )

    def decode_step(self, tokens: Tensor, cache: DecoderCache) -> Tensor:
        """tokens (N, T), usually T = 1: the newest token of each row -> hidden state (N, D)
        of the last one; appends to cache. With ``cache.align_layer`` set, cache.alignment
        becomes that layer's cross-attention probabilities for the last position, averaged
        over heads: (N, S), rows summing to one, zero at padded source positions."""
        x = self.tgt_embed(tokens, start=cache.pos)
        rotary = self.rotary_rows(cache.pos, tokens.size(1))
        for i, (layer, kv, layer_cache) in enumerate(zip(self.decoder, cache.memory_kv, cache.layers)):
            if i == cache.align_layer:
                x, weights = layer(x, kv, cache.mask, layer_cache, cache.groups, need_weights=True, rotary=rotary)
                cache.alignment = weights[:, :, -1].mean(dim=1)
            else:
                x = layer(x, kv, cache.mask, layer_cache, cache.groups, rotary=rotary)
        cache.pos += tokens.size(1)
        return self.decoder_norm(x)[:, -1]

    @staticmethod
    def select_cache(cache: DecoderCache, index: Tensor) -> DecoderCache:
        """The cache rows at ``index`` (N,): beam expansion, reordering, dropping rows.

        Memory is kept once per sentence while every sentence owns an equal, contiguous run
        of rows (as beam and greedy search keep them); reordering beams inside a sentence
        then touches only the self-attention cache, whose rows are picked lazily, during
        the next step's append. Any other selection falls back to one memory row per
        decoder row. The last step's alignment rows are picked too."""
        sentence = torch.div(index, cache.groups, rounding_mode="floor")  # old sentence of each new row
        kept = torch.unique_consecutive(sentence)
        groups = index.numel() // max(kept.numel(), 1)
        if groups * kept.numel() != index.numel() or not torch.equal(kept.repeat_interleave(groups), sentence):
            kept, groups = sentence, 1
        same = kept.numel() == cache.mask.size(0) and torch.equal(kept, torch.arange(kept.numel(), device=kept.device))
        pick = (lambda t: t) if same else (lambda t: t.index_select(0, kept))
        return DecoderCache(
            memory_kv=[(pick(k), pick(v)) for k, v in cache.memory_kv],
            layers=[c.reordered(index) for c in cache.layers],
            mask=pick(cache.mask),
            groups=groups,
            pos=cache.pos,
            align_layer=cache.align_layer,
            alignment=None if cache.alignment is None else cache.alignment.index_select(0, index),
        )

    def cross_attention(self, src: Tensor, tgt: Tensor) -> Tensor:
        """Cross-attention probabilities (L, B, H, T, S) of every decoder layer for a forced
        target, for attention pictures: the decoder layers' own forward, asked for weights."""
        memory, mask = self.encode(src)
        x = self.tgt_embed(tgt)
        rotary = self.rotary_rows(0, tgt.size(1))
        weights = []
        for layer in self.decoder:
            x, w = layer(x, layer.cross_attn.memory_kv(memory), mask, need_weights=True, rotary=rotary)
            weights.append(w)
        return torch.stack(weights)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def build_model(cfg: ModelConfig) -> Transformer:
    """A model with its vocabulary sizes already set in ``cfg``."""
    if cfg.src_vocab_size <= 0 or cfg.tgt_vocab_size <= 0:
        raise UserError("model.src_vocab_size and model.tgt_vocab_size must be set from the tokenizer")
    return Transformer(cfg)
