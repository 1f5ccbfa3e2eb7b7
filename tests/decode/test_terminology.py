"""Forced prefixes and terminology constraints through the Translator and transformer-decode:
text in, the promised target pieces out, one-line errors for what cannot be honoured."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from transformer import Translator
from transformer.config import DecodeConfig
from transformer.errors import UserError

SENTENCES = ["twenty-one", "I have three red apples.", "the nineteen small dogs"]
SEARCHES = [dict(beam_size=1), dict(beam_size=3), dict(sampling=True, top_k=1)]


@pytest.fixture(scope="module")
def translator(tiny_run: Path) -> Translator:
    return Translator.from_checkpoint(tiny_run, device="cpu")


def pieces(translator: Translator, text: str) -> list[str]:
    return translator.tokenizer.tgt_pieces(translator.tokenizer.encode_tgt([text])[0][1:-1])


def holds(tokens: list[str], phrase: list[str]) -> bool:
    return any(tokens[i : i + len(phrase)] == phrase for i in range(len(tokens)))


@pytest.mark.parametrize("search", SEARCHES)
def test_outputs_start_with_the_forced_prefix(translator: Translator, search: dict) -> None:
    forced = pieces(translator, "Wir sehen")
    for hyps in translator.hypotheses(SENTENCES, prefix="Wir sehen", precision="fp32", **search):
        assert hyps[0].tokens[: len(forced)] == forced
    per_line = translator.hypotheses(SENTENCES, prefix=["", "Ich", ""], precision="fp32", **search)
    plain = translator.hypotheses(SENTENCES, precision="fp32", **search)
    assert per_line[1][0].tokens[: len(pieces(translator, "Ich"))] == pieces(translator, "Ich")
    assert [per_line[i][0].text for i in (0, 2)] == [plain[i][0].text for i in (0, 2)]  # "": no prefix
    configured = Translator(translator.models, translator.tokenizer, DecodeConfig(prefix="Ich", precision="fp32"))
    assert configured.hypotheses(SENTENCES, **search) == translator.hypotheses(
        SENTENCES, prefix="Ich", precision="fp32", **search
    )  # decode.prefix is the argument's default


def test_a_prefix_longer_than_the_output_limit_names_the_line(translator: Translator) -> None:
    long_prefix = " ".join(["einundzwanzig"] * 20)
    with pytest.raises(UserError, match=r"^input line 6: its forced prefix has \d+ subwords"):
        translator.hypotheses(SENTENCES[:2], prefix=["", long_prefix], first_line=5, max_len_b=5)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_outputs_hold_every_constraint(translator: Translator, beam_size: int) -> None:
    phrases = [["Hunde"], ["rote", "Äpfel"], ["neunzehn", "kleinen"]]
    results = translator.hypotheses(SENTENCES, constraints=phrases, beam_size=beam_size, n_best=1, precision="fp32")
    for hyps, wanted in zip(results, phrases):
        assert all(holds(hyps[0].tokens, pieces(translator, p)) for p in wanted), (hyps[0].tokens, wanted)
    with pytest.raises(UserError, match="constraints need beam search"):
        translator.hypotheses(SENTENCES[:1], constraints=[["Hunde"]], sampling=True)


def test_a_constraint_that_cannot_fit_warns(translator: Translator, caplog: pytest.LogCaptureFixture) -> None:
    phrase = " ".join(["neunzehn"] * 6)
    with caplog.at_level(logging.WARNING):
        hyps = translator.hypotheses(SENTENCES[:1], constraints=[[phrase]], max_len_a=0.0, max_len_b=4)
    assert hyps[0] and "input line 1: no output within the length limit holds every constraint" in caplog.text


@pytest.mark.slow
def test_decode_reads_prefix_and_constraints_files(translator: Translator, tiny_run: Path, cli, tmp_path: Path) -> None:
    source, prefixes, constraints = tmp_path / "src.txt", tmp_path / "prefix.txt", tmp_path / "constraints.txt"
    source.write_text("".join(s + "\n" for s in SENTENCES), encoding="utf-8")
    prefixes.write_text("Wir\n\nIch\n", encoding="utf-8")
    constraints.write_text("Hunde\n\nneunzehn\tkleinen\n", encoding="utf-8")
    args = [f"checkpoint={tiny_run}", f"input={source}", "device=cpu", "decode.precision=fp32"]
    files = [f"decode.prefix_file={prefixes}", f"decode.constraints_file={constraints}"]
    result = cli("decode", *args, *files, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = translator.hypotheses(
        SENTENCES, prefix=["Wir", "", "Ich"], constraints=[["Hunde"], [], ["neunzehn", "kleinen"]], precision="fp32"
    )
    assert result.stdout.splitlines() == [hyps[0].text for hyps in expected]
    prefixes.write_text("Wir\n", encoding="utf-8")
    short = cli("decode", *args, *files, cwd=tmp_path)
    assert short.returncode != 0 and f"decode.prefix_file={prefixes} has 1 lines, fewer than the input" in short.stderr
    assert "Traceback" not in short.stderr
