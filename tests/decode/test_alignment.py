"""Word alignments: every target token gets the source position its step attended most, the
positions stay with their hypothesis through beam reordering, the model's cached hook agrees
with teacher-forced attention, and words come out of SentencePiece pieces as users count them."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_search import TinyModel

from transformer import Translator
from transformer.config import DecodeConfig
from transformer.decode.alignment import pharaoh, word_indices, word_pairs
from transformer.decode.batching import translate_ids
from transformer.decode.search import EOS, PAD, beam_search, greedy_search, sample
from transformer.errors import UserError

SENTENCES = ["twenty-one", "I have three red apples.", "the nineteen small dogs"]


def peak(src_row: list[int], prefix: list[int]) -> int:
    """The source position a scripted step attends to: a function of the row's whole prefix,
    among the real (not PAD, not EOS) source tokens."""
    real = [i for i, x in enumerate(src_row) if x not in (PAD, EOS)]
    return real[random.Random(str(prefix)).randrange(len(real))]


class Attending(TinyModel):
    """TinyModel (uncached) whose steps also attend: peaked at `peak` of each row's prefix, the
    rest spread over the real source tokens. The state carries the source and the attention."""

    def start(self, src: torch.Tensor) -> tuple:
        return super().start(src), src, torch.zeros(src.shape)

    def select(self, state: tuple, index: torch.Tensor) -> tuple:
        return tuple(s[index] for s in state)

    def step(self, state: tuple, prefix: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        context, src, _ = state
        log_probs, _ = super().step(context, prefix)
        real = ((src != PAD) & (src != EOS)).float()
        attention = real * 0.1 + (src == EOS).float() * 0.5  # EOS gets more than any word but the peak's
        for row, (s, p) in enumerate(zip(src.tolist(), prefix.tolist())):
            attention[row, peak(s, p)] = 1.0
        return log_probs, (context, src, attention / attention.sum(dim=1, keepdim=True))

    def attention(self, state: tuple) -> torch.Tensor:
        return state[2]


SRC = torch.tensor([[4, 5, 6, EOS], [7, EOS, PAD, PAD], [5, 5, 7, 6], [6, 4, EOS, PAD]])


@pytest.mark.parametrize(
    "search",
    [
        lambda m, **kw: greedy_search(m, SRC, **kw),
        lambda m, **kw: beam_search(m, SRC, beam_size=4, n_best=4, length_penalty=1.0, **kw),
        lambda m, **kw: sample(m, SRC, n=3, generator=torch.Generator().manual_seed(0), **kw),
    ],
    ids=["greedy", "beam", "sample"],
)
def test_links_follow_the_attention_of_each_hypothesis_step(search) -> None:
    # The peak depends on the whole prefix, so a link that stayed with another beam after
    # reordering would point elsewhere: every link must be the peak of its own prefix.
    results = search(Attending(seed=8), alignment=True)
    for src_row, hyps in zip(SRC.tolist(), results):
        assert hyps
        for h in hyps:
            assert len(h.alignment) == len(h.tokens)  # one link per target token, EOS included
            bos = [2]
            assert h.alignment == [peak(src_row, bos + h.tokens[:t]) for t in range(len(h.tokens))]
    plain = search(Attending(seed=8))
    assert [[h.tokens for h in hyps] for hyps in plain] == [[h.tokens for h in hyps] for hyps in results]
    assert all(h.alignment is None for hyps in plain for h in hyps)


def test_beams_are_reordered_in_the_scripted_search() -> None:
    # Guard for the test above: beams really change places (a row copied, another dropped).
    model, selections = Attending(seed=8), []
    select = model.select
    model.select = lambda state, index: selections.append(index) or select(state, index)  # type: ignore[method-assign]
    beam_search(model, SRC, beam_size=4, n_best=4, alignment=True)
    assert any(bool((ix[1:] <= ix[:-1]).any()) for ix in selections[1:])  # [0] expands each sentence to 4 rows


def test_word_indices_and_pairs() -> None:
    pieces = ["__de__", "▁Wir", "▁seh", "en", "▁", "3", "▁Autos", "."]
    assert word_indices(pieces, 1, len(pieces)) == [None, 0, 1, 1, 2, 2, 3, 3]
    assert word_indices(["en", "▁a", "</s>"], 0, 2) == [0, 1, None]  # a first piece without ▁ starts word 0
    pairs = word_pairs([1, 1, 0, 2, 5], source_words=[0, 1, 1, None], target_words=[0, 1, 1, 2, None])
    assert pairs == [(0, 1), (1, 0), (1, 1), (1, 2)]  # links to or from no word dropped, each pair once
    assert pharaoh(pairs) == "0-1 1-0 1-1 1-2"


@pytest.fixture(scope="module")
def translator(tiny_run: Path) -> Translator:
    return Translator.from_checkpoint(tiny_run, device="cpu")


@pytest.mark.parametrize("beam_size", [1, 3])
def test_cached_links_equal_teacher_forced_attention(translator: Translator, beam_size: int) -> None:
    # The model's hook (cached steps, beams reordered) against a fresh forced decode of each output.
    cfg = DecodeConfig(beam_size=beam_size, n_best=beam_size, precision="fp32", alignment=True, alignment_layer=-1)
    src_ids = translator.tokenizer.encode_src(SENTENCES)
    for ids, hyps in zip(src_ids, translate_ids(translator.models, src_ids, cfg)):
        real = torch.tensor([x > EOS for x in ids])
        for h in hyps:
            weights = translator.attention(ids, h.tokens, layer=-1)  # (T, S) mean over heads
            assert h.alignment == weights.masked_fill(~real, -1.0).argmax(dim=1).tolist()


def test_translations_carry_word_alignments(translator: Translator) -> None:
    for hyps in translator.hypotheses(SENTENCES, alignment=True, n_best=2, precision="fp32"):
        for h in hyps:
            pieces = [p for p in h.tokens if p != "</s>"]
            target_words = 1 + sum(p.startswith("▁") for p in pieces[1:]) if pieces else 0
            assert {j for _, j in h.alignment} == set(range(target_words))  # every target word has a link
    assert all(h.alignment is None for h in translator.hypotheses(SENTENCES[:1])[0])
    with pytest.raises(UserError, match="decode.alignment_layer=1: the model has 1 decoder layers"):
        translator.hypotheses(SENTENCES[:1], alignment=True, alignment_layer=1)
    ensemble = Translator(translator.models * 2, translator.tokenizer)
    same = ensemble.hypotheses(SENTENCES, alignment=True, precision="fp32")
    assert [h[0].alignment for h in same] == [h[0].alignment for h in translator.hypotheses(SENTENCES, alignment=True)]


@pytest.mark.slow
def test_decode_prints_pharaoh_alignments(translator: Translator, tiny_run: Path, cli, tmp_path: Path) -> None:
    source = tmp_path / "src.txt"
    source.write_text("".join(s + "\n" for s in SENTENCES), encoding="utf-8")
    args = [f"checkpoint={tiny_run}", f"input={source}", "device=cpu", "decode.precision=fp32", "decode.alignment=true"]
    result = cli("decode", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = translator.hypotheses(SENTENCES, alignment=True, precision="fp32")
    assert result.stdout.splitlines() == [f"{h[0].text} ||| {pharaoh(h[0].alignment)}" for h in expected]


def test_server_answers_word_alignments(tiny_run: Path) -> None:
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from transformer.serve.app import create_app
    from transformer.serve.models import load_served_model
    from transformer.serve.settings import ServeConfig

    served = load_served_model("", str(tiny_run), "cpu", replace(DecodeConfig(), precision="fp32"))
    with TestClient(create_app([served], ServeConfig())) as client:
        answer = client.post("/translate", json={"texts": SENTENCES, "alignment": True}).json()
    expected = served.translator.hypotheses(SENTENCES, alignment=True)
    for got, hyps in zip(answer["translations"], expected):
        assert got["hypotheses"][0]["alignment"]["words"] == pharaoh(hyps[0].alignment)
