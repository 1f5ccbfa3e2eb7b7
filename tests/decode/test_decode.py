"""Search on the real model: what test_search.py proves with scripted scorers must still hold
when the scorer is a Transformer with a key/value cache, padding and length batching.

Models are tiny and untrained (random weights give a flat, tie-free distribution, which is
all these properties need); every expected value is recomputed by teacher forcing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tiny import VOCAB, eos_prone, padded, random_sources, tiny_model, tiny_tokenizer
from transformer.config import DecodeConfig
from transformer.decode.batching import translate_ids
from transformer.decode.scorer import ModelScorer
from transformer.decode.search import beam_search, greedy_search, length_penalty, sample
from transformer.decode.translator import Translator
from transformer.model import Transformer
from transformer.vocab import BOS, EOS

torch.set_num_threads(1)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


def forced_log_probs(model: Transformer, src: list[int], tgt: list[int]) -> torch.Tensor:
    """Teacher-forced log-prob of each token of ``tgt`` (which ends with EOS), shape (T,)."""
    with torch.no_grad():
        logits = model(torch.tensor([src]), torch.tensor([[BOS] + tgt[:-1]]))[0]  # (T, V)
    return F.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(tgt)[:, None]).squeeze(1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_first", [False, True])
def test_cached_steps_equal_uncached_and_full_forward(norm_first, device):
    model = tiny_model(norm_first).to(device)
    src = padded(random_sources([7, 4, 9])).to(device)
    prefix = torch.cat([torch.full((3, 1), BOS), torch.randint(EOS + 1, VOCAB, (3, 8))], dim=1).to(device)  # (B, T)
    tol = 1e-5 if device == "cpu" else 1e-4  # GPU kernels differ between one step and the whole prefix
    with torch.no_grad():
        full = F.log_softmax(model(src, prefix), dim=-1)  # (B, T, V)
        cached, uncached = ModelScorer(model, cached=True), ModelScorer(model, cached=False)
        c_state, u_state = cached.start(src), uncached.start(src)
        order = torch.arange(3, device=device)
        for t in range(1, prefix.size(1) + 1):
            if t == 4:  # reorder rows mid-way, as beam search does
                order = torch.tensor([2, 0, 1], device=device)
                c_state, u_state = cached.select(c_state, order), uncached.select(u_state, order)
            c_lp, c_state = cached.step(c_state, prefix[order, :t])
            u_lp, u_state = uncached.step(u_state, prefix[order, :t])
            torch.testing.assert_close(c_lp, u_lp, atol=tol, rtol=0)
            torch.testing.assert_close(c_lp, full[order, t - 1], atol=tol, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_beam_size_one_is_greedy(device):
    model = tiny_model().to(device)
    sources = random_sources([5, 9, 3, 12, 7])
    greedy = translate_ids([model], sources, DecodeConfig(beam_size=1, precision="fp32"))
    with torch.inference_mode():
        beam = beam_search(
            ModelScorer(model),
            padded(sources).to(device),
            beam_size=1,
            lp_style="gnmt",
            early_stop="fairseq",
            max_len_limit=63,
        )
        plain = greedy_search(ModelScorer(model), padded(sources).to(device), max_len_limit=63)
    assert [h[0].tokens for h in greedy] == [h[0].tokens for h in beam] == [h[0].tokens for h in plain]
    for g, b in zip(greedy, beam):
        assert g[0].log_prob == pytest.approx(b[0].log_prob, abs=1e-4)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("beam_size", [1, 4])
def test_sentence_alone_equals_sentence_in_batch(norm_first, beam_size):
    model = tiny_model(norm_first)
    sources = random_sources([6, 2, 11, 4, 15])
    cfg = DecodeConfig(beam_size=beam_size, n_best=beam_size, batch_tokens=10_000)
    together = translate_ids([model], sources, cfg)
    for src, hyps in zip(sources, together):
        alone = translate_ids([model], [src], cfg)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in hyps]
        assert [h.score for h in alone] == pytest.approx([h.score for h in hyps], abs=1e-4)


@pytest.mark.parametrize("lp_style", ["gnmt", "average"])
def test_nbest_sorted_and_equal_to_rescoring(lp_style):
    model = eos_prone(tiny_model(), boost=1.0)  # a mix of early EOS and forced EOS at the limit
    sources = random_sources([5, 8, 3])
    cfg = DecodeConfig(beam_size=5, n_best=5, length_penalty=1.0, lp_style=lp_style, precision="fp32")
    for src, hyps in zip(sources, translate_ids([model], sources, cfg)):
        assert len(hyps) == 5
        assert len({tuple(h.tokens) for h in hyps}) == 5
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        for h in hyps:
            assert h.tokens[-1] == EOS and EOS not in h.tokens[:-1]
            lps = forced_log_probs(model, src, h.tokens)
            assert h.token_log_probs == pytest.approx(lps.tolist(), abs=1e-4)
            assert h.log_prob == pytest.approx(float(lps.sum()), abs=1e-4)
            assert h.score == pytest.approx(float(lps.sum()) / length_penalty(len(h.tokens), 1.0, lp_style), abs=1e-4)


def test_translator_returns_input_order():
    tokenizer = tiny_tokenizer()
    model = tiny_model(vocab=tokenizer.src_vocab_size)
    translator = Translator([model], tokenizer, DecodeConfig(beam_size=3, n_best=2, batch_tokens=12))
    sentences = ["three hundred forty-five", "one", "the nineteen small dogs see seventy-seven red cars", "twelve", ""]
    one_by_one = [translator.translate(s) for s in sentences]
    assert all(isinstance(t, str) for t in one_by_one)
    assert translator.translate(sentences) == one_by_one
    hyps = translator.hypotheses(sentences)
    assert [h[0].text for h in hyps] == one_by_one
    assert all(len(h) == 2 and h[0].score >= h[1].score for h in hyps)


class _Widened:
    """A shortlisted scorer's steps spread over the whole vocabulary, -inf off the list: the
    reference the narrow search (one column per candidate) must equal."""

    def __init__(self, narrow: ModelScorer) -> None:
        self.narrow = narrow
        self.start, self.select = narrow.start, narrow.select

    def step(self, state, prefix):
        log_probs, state = self.narrow.step(state, prefix)
        full = log_probs.new_full((log_probs.size(0), VOCAB), float("-inf"))
        return full.index_copy_(1, self.narrow.vocab, log_probs), state


@pytest.mark.parametrize(
    "search, settings",
    [
        (greedy_search, {}),
        (greedy_search, {"prefix": [[9], [], [11, 5]]}),
        (beam_search, {"beam_size": 4, "n_best": 3}),
        (beam_search, {"beam_size": 3, "prefix": [[], [9, 9], [5]], "min_len": 2}),
        (beam_search, {"beam_size": 3, "constraints": [[[13, 5]], [], [[9]]]}),
        (sample, {"n": 3, "top_k": 4}),
    ],
)
def test_a_shortlisted_search_over_its_columns_equals_one_over_the_masked_vocabulary(search, settings):
    model = eos_prone(tiny_model(), 3.0)
    src = padded(random_sources([6, 4, 9]))
    vocab = torch.tensor([BOS, EOS, 5, 7, 9, 11, 13, 17, 20])  # BOS on the list: still never generated
    if search is sample:
        settings = {**settings, "generator": torch.Generator().manual_seed(3)}
    with torch.inference_mode():
        narrow = search(ModelScorer(model, vocab=vocab), src, max_len_limit=20, **settings)
        if search is sample:
            settings["generator"].manual_seed(3)
        wide = search(_Widened(ModelScorer(model, vocab=vocab)), src, max_len_limit=20, **settings)
    assert [[h.tokens for h in hyps] for hyps in narrow] == [[h.tokens for h in hyps] for hyps in wide]
    assert all(set(h.tokens) <= set(vocab[1:].tolist()) for hyps in narrow for h in hyps)
    for n, w in zip(narrow, wide):
        assert [h.score for h in n] == pytest.approx([h.score for h in w], abs=1e-5)
