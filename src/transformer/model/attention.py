"""Multi-head attention through ``F.scaled_dot_product_attention``, with a key/value cache.

Self-attention projects Q, K and V with one fused matmul; cross-attention projects Q
from the decoder and K, V (fused) from the encoder output once per source batch.
Masks are boolean (True = may attend), never large negative numbers, so fp16/bf16 are safe.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from transformer.errors import UserError
from transformer.model.cache import LayerCache


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """(B, T, D) -> (B, H, T, Dh)."""
    b, t, d = x.shape
    return x.view(b, t, n_heads, d // n_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, Dh) -> (B, T, D)."""
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)


# cuDNN's attention kernel, which PyTorch may pick first on Hopper in bf16/fp16, builds an
# execution plan for every new (batch, length) shape, and token-budget batches rarely repeat
# one: excluded, so CUDA takes the flash or memory-efficient kernel, which need no plan (H200,
# base model, bf16, 16k-token Multi30k batches: 309 -> 65 ms a training step).
CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# At most this many queries per key row, CPU inference with a padding mask (a search step's
# cross-attention: 1 query per sentence greedy, one per beam at beam 5) is faster spelled out
# than through SDPA's fused CPU kernel, which blocks for long query runs: 4 heads x 32 wide,
# 270 sentences x 20 source tokens, AVX2, 2 threads: 5 queries 1.6 against 7.4 ms, 20
# queries 5.0 against 10.1, 32 queries 18 against 12 (8 x 64 heads: 1.8/4.8 at 5, 6.5/7.8 at 32).
FEW_QUERIES = 16


def few_queries(q: Tensor, mask: Tensor | None, causal: bool, dropout: float) -> bool:
    """Whether ``sdpa`` spells the attention out (see FEW_QUERIES). The query count is read
    last: under torch.compile, comparing a dynamic size would add a guard, and a graph per
    side of it, to training's graphs (grad mode and compiling decide first)."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32  # bf16 keeps the math backend's fp32 accumulation (measured in fp32 only)
        and mask is not None
        and not (causal or dropout or torch.is_grad_enabled() or torch.compiler.is_compiling())
        and q.size(-2) <= FEW_QUERIES
    )


def sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False, dropout: float = 0.0
) -> Tensor:
    """``F.scaled_dot_product_attention`` on the backends that suit variable shapes. On CPU in
    bf16/fp16 its math backend is chosen: the fused CPU kernel's backward is ~3x slower there
    than the math backend (measured 26 ms against 8 ms for 180 x 4 heads x 24 x 64), a third
    of a bf16 training step."""
    if few_queries(q, mask, causal, dropout):
        return attention_weights(q, k, mask) @ v
    if q.device.type == "cuda":
        backends = sdpa_kernel(CUDA_BACKENDS)
    elif q.dtype in (torch.bfloat16, torch.float16):
        backends = sdpa_kernel(SDPBackend.MATH)
    else:
        backends = contextlib.nullcontext()
    with backends:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax(QK^T/sqrt(d)) spelled out: attention pictures, alignments, and search steps'
    attention over few queries (``sdpa``)."""
    scores = (q @ k.transpose(-2, -1)).mul_(q.size(-1) ** -0.5)  # (B, H, Tq, Tk)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return scores.softmax(-1)


def rotary_table(n_positions: int, head_dim: int) -> Tensor:
    """Rotary position embedding (RoFormer, Su et al. 2021): cos and sin of the angles
    position x 10000^(-2i/Dh), each repeated for both halves of a head, (2, n_positions, Dh)."""
    if head_dim % 2:
        raise UserError(f"model.positional=rope needs an even head width (model.d_model / model.n_heads = {head_dim})")
    freqs = torch.pow(10000.0, -torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * freqs[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return torch.stack([angles.cos(), angles.sin()]).float()


def rotate(x: Tensor, table: Tensor) -> Tensor:
    """Queries or keys x (B, H, T, Dh) turned by their positions' angles ``table`` (2, T, Dh):
    each pair (x_i, x_{i+Dh/2}) is rotated, so q_m . k_n depends on m - n only. In fp32."""
    cos, sin = table
    y = x.float()
    half = y.size(-1) // 2
    turned = torch.cat([-y[..., half:], y[..., :half]], dim=-1)
    return (y * cos + turned * sin).to(x.dtype)


class SelfAttention(nn.Module):
    """Self-attention; ``causal`` for the decoder, which may also keep a K/V cache."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, causal: bool):
        super().__init__()
        if d_model % n_heads:
            raise UserError(f"model.d_model={d_model} is not divisible by model.n_heads={n_heads}")
        self.n_heads, self.dropout, self.causal = n_heads, dropout, causal
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, cache: LayerCache | None = None, rotary: Tensor | None = None
    ) -> Tensor:
        """x (B, T, D). mask (B, 1, 1, T) for padded keys. With ``cache``, x holds only the
        newest positions and their K/V are appended to the cache (LayerCache.append), which
        picks the cached rows at cache.index first when a reordering is pending. ``rotary`` (2, T, Dh): the
        rotary table of x's positions (model.positional=rope); keys are cached rotated."""
        q, k, v = (split_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))
        if rotary is not None:
            q, k = rotate(q, rotary), rotate(k, rotary)
        causal = self.causal
        if cache is not None:
            if cache.length:
                causal = causal and q.size(2) > 1  # one new position attends to all of the past
            k, v = cache.append(k, v)
        if causal and q.size(2) != k.size(2):
            raise ValueError("causal attention over a cache takes one new position at a time")
        y = sdpa(q, k, v, mask, causal and mask is None, self.dropout if self.training else 0.0)
        return self.out(merge_heads(y))


class CrossAttention(nn.Module):
    """Decoder queries over encoder keys/values; K/V are computed once per source batch."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder output (B, S, D) -> K, V each (B, H, S, Dh)."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return split_heads(k, self.n_heads), split_heads(v, self.n_heads)

    def forward(
        self, x: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor, need_weights: bool = False, groups: int = 1
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, T, D); mask (B, 1, 1, S) True for real source tokens. ``need_weights``: also
        the attention probabilities (B, H, T, S), spelled out beside SDPA's output, so asking
        for them leaves the output unchanged.

        ``groups`` > 1 (search, T = 1): x holds ``groups`` consecutive rows per source
        sentence (its beams) and kv/mask one row per sentence; the beams become query
        positions of one attention over their sentence, so memory is never copied per beam."""
        k, v = kv
        if groups > 1:
            n, _, d = x.shape
            q = self.q(x).view(n // groups, groups, self.n_heads, d // self.n_heads).transpose(1, 2)  # (B, H, G, Dh)
            out = self.out(sdpa(q, k, v, mask).transpose(1, 2).reshape(n, 1, d))
        else:
            q = split_heads(self.q(x), self.n_heads)
            out = self.out(merge_heads(sdpa(q, k, v, mask, dropout=self.dropout if self.training else 0.0)))
        if not need_weights:
            return out
        weights = attention_weights(q, k, mask)  # (B, H, T, S), or (B, H, G, S) for groups
        if groups > 1:
            weights = weights.transpose(1, 2).reshape(x.size(0), self.n_heads, 1, -1)
        return out, weights
