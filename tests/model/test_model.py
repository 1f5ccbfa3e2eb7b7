"""The model is checked through properties that hold for any weights: masks are tested by
perturbing positions that must not matter (future target tokens, padding), incremental
decoding against teacher forcing, and learning by overfitting one small batch."""

from __future__ import annotations

import itertools

import pytest
import torch

from tiny import tiny_config as shared_tiny_config
from transformer.config import ModelConfig
from transformer.model import Transformer, build_model
from transformer.model.attention import FEW_QUERIES, few_queries, sdpa
from transformer.model.onednn_linear import OneDNNLinear, train_linears_on_onednn
from transformer.model.prepack import PackedLinear, packed_for_cpu
from transformer.model.transformer import Dropout
from transformer.vocab import BOS, EOS, PAD

VOCAB = 20


def tiny_config(**overrides) -> ModelConfig:
    """Narrower than tests/tiny.py's: width 16, 2 heads, 32 positions, a vocabulary of 20."""
    return shared_tiny_config(VOCAB, **{"d_model": 16, "n_heads": 2, "d_ff": 32, "max_positions": 32, **overrides})


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return build_model(tiny_config(**overrides)).eval()


def random_ids(rows: int, length: int, seed: int) -> torch.Tensor:
    """Ordinary token ids (no PAD/BOS/EOS), (rows, length)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(EOS + 1, VOCAB, (rows, length), generator=g)


def test_output_shapes() -> None:
    model = tiny_model()
    src, tgt = random_ids(3, 7, 1), random_ids(3, 5, 2)
    memory, mask = model.encode(src)
    assert memory.shape == (3, 7, 16)
    assert mask.shape == (3, 1, 1, 7) and mask.dtype == torch.bool
    assert model(src, tgt).shape == (3, 5, VOCAB)
    keep = torch.zeros(3, 5, dtype=torch.bool)
    keep[0, :2] = keep[2, :4] = True
    assert model(src, tgt, keep).shape == (6, VOCAB)


@torch.no_grad()
def test_future_target_tokens_do_not_change_earlier_outputs() -> None:
    model = tiny_model()
    src, tgt = random_ids(2, 6, 1), random_ids(2, 8, 2)
    changed = tgt.clone()
    changed[:, 5] = (changed[:, 5] - EOS) % (VOCAB - EOS - 1) + EOS + 1  # another ordinary token
    a, b = model(src, tgt), model(src, changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])  # the perturbation is seen where it may be


@torch.no_grad()
def test_padded_memory_positions_are_ignored() -> None:
    """Whatever the encoder leaves at padded source positions, the decoder never reads it."""
    model = tiny_model()
    src = random_ids(2, 6, 1)
    src[1, 3:] = PAD
    tgt = random_ids(2, 5, 2)
    memory, mask = model.encode(src)
    noisy = memory.clone()
    noisy[1, 3:] = torch.randn(3, 16) * 10
    torch.testing.assert_close(model.decode(tgt, memory, mask), model.decode(tgt, noisy, mask))
    noisy[1, 2] += 1.0  # a real position does matter
    assert not torch.allclose(model.decode(tgt, memory, mask)[1], model.decode(tgt, noisy, mask)[1])


@pytest.mark.parametrize("norm_first", [False, True])
@torch.no_grad()
def test_sentence_alone_equals_inside_a_padded_batch(norm_first: bool) -> None:
    model = tiny_model(norm_first=norm_first)
    src, tgt = random_ids(1, 4, 1), random_ids(1, 3, 2)
    alone = model(src, tgt)
    long_src, long_tgt = random_ids(2, 9, 3), random_ids(2, 7, 4)
    long_src[1] = PAD
    long_src[1, :4] = src[0]
    long_tgt[1] = PAD
    long_tgt[1, :3] = tgt[0]
    batched = model(long_src, long_tgt)
    torch.testing.assert_close(batched[1, :3], alone[0])


@torch.no_grad()
def test_target_padding_does_not_change_real_positions() -> None:
    model = tiny_model()
    src, tgt = random_ids(2, 5, 1), random_ids(2, 4, 2)
    padded = torch.cat([tgt, torch.full((2, 3), PAD)], dim=1)
    torch.testing.assert_close(model(src, padded)[:, :4], model(src, tgt))


@pytest.mark.parametrize(
    "norm_first, positional, activation",
    list(itertools.product([False, True], ["sinusoidal", "sinusoidal_fairseq", "learned"], ["relu", "gelu"])),
)
def test_every_variant_builds_runs_and_trains(norm_first: bool, positional: str, activation: str) -> None:
    model = tiny_model(norm_first=norm_first, positional=positional, activation=activation).train()
    src, tgt = random_ids(2, 5, 1), random_ids(2, 4, 2)
    logits = model(src, tgt)
    assert logits.shape == (2, 4, VOCAB) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if norm_first:
        assert isinstance(model.encoder_norm, torch.nn.LayerNorm)
    if positional == "learned":
        assert model.src_embed.positions is not None and model.src_embed.positions.weight.grad is not None


def test_sinusoidal_styles_differ() -> None:
    paper = tiny_model(positional="sinusoidal").tgt_embed.table
    fairseq = tiny_model(positional="sinusoidal_fairseq").tgt_embed.table
    assert paper.shape == fairseq.shape == (32, 16)
    assert torch.equal(paper[0, :8], torch.zeros(8))  # sin(0) at position 0
    assert not torch.allclose(paper, fairseq)


def test_unknown_choices_fail_with_the_key() -> None:
    with pytest.raises(ValueError, match="model.positional"):
        tiny_model(positional="rotary")
    with pytest.raises(ValueError, match="model.activation"):
        tiny_model(activation="swish")
    with pytest.raises(ValueError, match="model.n_heads"):
        tiny_model(n_heads=3)


def test_tied_and_shared_embeddings_share_storage() -> None:
    model = tiny_model(share_embeddings=True, tie_output=True)
    assert model.src_embed.tokens is model.tgt_embed.tokens
    assert model.output.weight.data_ptr() == model.tgt_embed.tokens.weight.data_ptr()
    untied = tiny_model(share_embeddings=False, tie_output=False, src_vocab_size=VOCAB + 5)
    assert untied.src_embed.tokens is not untied.tgt_embed.tokens
    assert untied.output.weight.data_ptr() != untied.tgt_embed.tokens.weight.data_ptr()
    assert untied.num_parameters() > model.num_parameters()
    with pytest.raises(ValueError, match="joint"):
        tiny_model(share_embeddings=True, src_vocab_size=VOCAB + 5)


def test_init_is_deterministic_under_a_seed() -> None:
    a, b, c = tiny_model(seed=3).state_dict(), tiny_model(seed=3).state_dict(), tiny_model(seed=4).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert torch.equal(a["tgt_embed.tokens.weight"][PAD], torch.zeros(16))


@torch.no_grad()
def test_incremental_decoding_equals_teacher_forcing() -> None:
    model = tiny_model(norm_first=True)
    src = random_ids(3, 6, 1)
    src[2, 4:] = PAD
    tgt = torch.cat([torch.full((3, 1), BOS), random_ids(3, 5, 2)], dim=1)
    memory, mask = model.encode(src)
    full = model.decode(tgt, memory, mask)
    cache = model.start_cache(memory, mask)
    steps = [model.decode_step(tgt[:, t : t + 1], cache) for t in range(tgt.size(1))]
    torch.testing.assert_close(torch.stack(steps, dim=1), full)
    # select_cache keeps rows in step: continue row 2 alone and compare
    cache = model.start_cache(memory, mask)
    for t in range(3):
        model.decode_step(tgt[:, t : t + 1], cache)
    row = model.select_cache(cache, torch.tensor([2]))
    torch.testing.assert_close(model.decode_step(tgt[2:3, 3:4], row)[0], full[2, 3])
    # two selections before the next step compose: rows [2, 0, 1] then [1, 1] are row 0 twice
    twice = model.select_cache(model.select_cache(cache, torch.tensor([2, 0, 1])), torch.tensor([1, 1]))
    out = model.decode_step(tgt[[0, 0], 3:4], twice)
    torch.testing.assert_close(out, full[[0, 0], 3])


@torch.no_grad()
def test_cached_steps_write_in_place_and_copy_the_past_only_to_grow_or_reorder() -> None:
    model = tiny_model()
    memory, mask = model.encode(random_ids(2, 5, 1))
    cache = model.start_cache(memory, mask)
    buffers: list[torch.Tensor] = []  # every buffer the cache used, held so none is freed and reused

    def changed() -> bool:
        k = cache.layers[0].k
        new = all(k is not b for b in buffers)
        buffers.append(k)
        return new

    steps = []
    for t in range(28):  # greedy: no reordering, the buffer doubles when full
        model.decode_step(random_ids(2, 1, t), cache)
        steps.append(changed())
    assert [t + 1 for t, new in enumerate(steps) if new] == [1, 3, 7, 15]  # room for 2, 6, 14, 30
    for t in range(3):  # beams: every reordering is applied by one copy at the next append
        cache = model.select_cache(cache, torch.tensor([1, 0]))
        assert cache.layers[0].index is not None
        model.decode_step(random_ids(2, 1, t), cache)
        assert cache.layers[0].index is None and changed()


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, -1])
def test_step_alignment_equals_forced_cross_attention(layer: int) -> None:
    """decode_step's alignment (N, S) is the chosen layer's cross-attention for the newest
    position, averaged over heads, as cross_attention gives it for the whole target; asking
    for it leaves the hidden states unchanged, and it survives beam-style selections."""
    model = tiny_model(norm_first=True)
    src = random_ids(2, 6, 1)
    src[1, 4:] = PAD
    tgt = torch.cat([torch.full((2, 1), BOS), random_ids(2, 4, 2)], dim=1)
    forced = model.cross_attention(src, tgt)[layer].mean(dim=1)  # (B, T, S)
    memory, mask = model.encode(src)
    plain, aligned = model.start_cache(memory, mask), model.start_cache(memory, mask, align_layer=layer)
    assert plain.alignment is None
    for t in range(tgt.size(1)):
        hidden = model.decode_step(tgt[:, t : t + 1], aligned)
        assert torch.equal(hidden, model.decode_step(tgt[:, t : t + 1], plain))
        torch.testing.assert_close(aligned.alignment, forced[:, t])
        assert plain.alignment is None
    assert torch.all(aligned.alignment[1, 4:] == 0)
    # beams: each sentence's row twice (groups=2), then reordered inside the sentences
    beams = model.select_cache(model.start_cache(memory, mask, align_layer=layer), torch.tensor([0, 0, 1, 1]))
    for t in range(2):
        model.decode_step(tgt[[0, 0, 1, 1], t : t + 1], beams)
    assert beams.groups == 2
    torch.testing.assert_close(beams.alignment, forced[[0, 0, 1, 1], 1])
    beams = model.select_cache(beams, torch.tensor([1, 0, 3, 3]))
    torch.testing.assert_close(beams.alignment, forced[[0, 0, 1, 1], 1])
    model.decode_step(tgt[[0, 0, 1, 1], 2:3], beams)
    torch.testing.assert_close(beams.alignment, forced[[0, 0, 1, 1], 2])
    with pytest.raises(ValueError, match="alignment layer 2: the model has 2 decoder layers"):
        model.start_cache(memory, mask, align_layer=2)


def test_overfits_one_batch() -> None:
    """A copy task on four sentences: the model must be able to drive the loss to ~0."""
    torch.manual_seed(0)
    model = build_model(tiny_config(d_model=32, n_heads=4, d_ff=64)).train()
    src = random_ids(4, 6, 7)
    src[3, 4:] = PAD
    src = torch.cat([src, torch.full((4, 1), PAD)], dim=1)
    src[torch.arange(4), (src != PAD).sum(1)] = EOS
    tgt = torch.cat([torch.full((4, 1), BOS), src], dim=1)  # BOS + copy + EOS (+ PAD)
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
    keep = tgt_out != PAD
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(model(src, tgt_in, keep), tgt_out[keep])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if loss.item() < 0.05:
            break
    assert losses[-1] < 0.05, f"loss only fell from {losses[0]:.3f} to {losses[-1]:.3f}"
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(src, tgt_in, keep).argmax(-1), tgt_out[keep])


def test_over_long_input_names_max_positions() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=r"sequence of 33 subwords exceeds model.max_positions=32"):
        model.encode(random_ids(1, 33, 1))
    memory, mask = model.encode(random_ids(1, 4, 1))
    cache = model.start_cache(memory, mask)
    cache.pos = 32
    with pytest.raises(ValueError, match="max_positions"):
        model.decode_step(torch.tensor([[BOS]]), cache)


def test_build_model_needs_vocabulary_sizes() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(ModelConfig(d_model=16, n_heads=2))


def test_dropout_rate_scale_and_eval_identity() -> None:
    drop = Dropout(0.3).train()
    torch.manual_seed(0)
    y = drop(torch.ones(400, 500))
    assert abs((y == 0).float().mean().item() - 0.3) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01  # inverted: the expectation is kept
    assert y.unique().tolist() == [0.0, pytest.approx(1 / 0.7, rel=1e-3)]
    assert drop(torch.ones(3, 5, 7, dtype=torch.bfloat16)).dtype == torch.bfloat16
    x = torch.randn(4, 6)
    assert torch.equal(drop.eval()(x), x)


def test_word_dropout_drops_whole_token_vectors() -> None:
    drop = Dropout(0.2, whole_vectors=True).train()
    torch.manual_seed(0)
    y = drop(torch.ones(50, 400, 8))
    per_token = y[..., :1]
    assert torch.equal(y, per_token.expand_as(y))  # one draw per token vector
    assert abs((per_token == 0).float().mean().item() - 0.2) < 0.01
    assert per_token.unique().tolist() == [0.0, pytest.approx(1 / 0.8, rel=1e-3)]


@pytest.mark.parametrize("side", ["src", "tgt"])
def test_word_dropout_hides_token_identities_in_training_only(side: str) -> None:
    """At rate 1 every token vector of that side is dropped: the output no longer depends
    on which tokens were there (positions still count); in eval mode it does again."""
    model = tiny_model(**{f"{side}_word_dropout": 1.0})
    src, tgt = random_ids(2, 6, 1), random_ids(2, 5, 2)
    other = {"src": (random_ids(2, 6, 3), tgt), "tgt": (src, random_ids(2, 5, 4))}[side]

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        return model(src, tgt), model(*other)

    assert not torch.allclose(*both())
    model.train()
    assert torch.allclose(*both())


@pytest.mark.parametrize("causal", [False, True])
def test_reduced_precision_attention_backend_matches_fp32(causal: bool) -> None:
    """On CPU in bf16, ``sdpa`` switches to the math backend; values and gradients must agree."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 8, generator=g) for _ in range(3))
    mask = None if causal else torch.rand(3, 1, 1, 7, generator=g) > 0.3
    if mask is not None:
        mask[..., 0] = True
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        qkv = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        y = sdpa(*qkv, mask, causal)
        y.float().square().sum().backward()
        outs[dtype] = (y.float(), qkv[0].grad.float())
    for a, b in zip(outs[torch.float32], outs[torch.bfloat16]):
        torch.testing.assert_close(b, a, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("queries", [1, 5, FEW_QUERIES, FEW_QUERIES + 1])
def test_few_query_attention_spelled_out_equals_sdpa(queries: int) -> None:
    """A search step's masked attention over few queries is spelled out (faster on CPU): same
    values as SDPA's kernel; with gradients, causal or over more queries, SDPA is used."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 2, queries, 8, generator=g)
    k, v = (torch.randn(6, 2, 9, 8, generator=g) for _ in range(2))
    mask = torch.rand(6, 1, 1, 9, generator=g) > 0.4
    mask[..., 0] = True
    with torch.inference_mode():
        assert few_queries(q, mask, False, 0.0) == (queries <= FEW_QUERIES)
        assert not few_queries(q, mask, True, 0.0) and not few_queries(q, None, False, 0.0)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(sdpa(q, k, v, mask), expected, atol=1e-6, rtol=1e-5)
        assert not few_queries(q.bfloat16(), mask, False, 0.0)  # bf16 keeps SDPA's math backend
    assert not few_queries(q.requires_grad_(), mask, False, 0.0)  # training keeps the fused kernel


@pytest.mark.parametrize("norm_first", [False, True])
def test_packed_copy_computes_the_same_logits_and_leaves_the_model_alone(norm_first: bool) -> None:
    model = tiny_model(norm_first=norm_first).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    packed = packed_for_cpu(model)
    src, tgt = random_ids(3, 7, seed=1), random_ids(3, 5, seed=2)
    with torch.inference_mode():
        torch.testing.assert_close(packed(src, tgt), model(src, tgt), atol=1e-5, rtol=1e-5)
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("norm_first", [False, True])
def test_onednn_linears_train_like_nn_linear(norm_first: bool) -> None:
    """Same loss and gradients (tied output weight included) as nn.Linear, same state dict;
    bf16 autocast falls back to nn.Linear's own path."""
    plain = tiny_model(norm_first=norm_first).train()
    onednn = train_linears_on_onednn(tiny_model(norm_first=norm_first).train())
    onednn.load_state_dict(plain.state_dict())
    assert (
        any(isinstance(m, OneDNNLinear) for m in onednn.modules())
        and plain.state_dict().keys() == onednn.state_dict().keys()
    )
    src, tgt = random_ids(3, 7, seed=1), random_ids(3, 5, seed=2)
    for model in (plain, onednn):
        torch.manual_seed(0)  # same dropout masks
        model(src, tgt).log_softmax(-1).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), onednn.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        a = plain(src, tgt)
        torch.manual_seed(0)
        b = onednn(src, tgt)
    assert torch.equal(a, b)
