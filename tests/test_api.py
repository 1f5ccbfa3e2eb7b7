"""The Python API as a user calls it (Translator, train_and_test, evaluate), its agreement with the
console scripts, the attention picture, and the documentation of every config key."""

from __future__ import annotations

import ast
import dataclasses
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from transformer import Translator
from transformer.config import DecodeConfig
from transformer.decode.prepare import pack_models, resolve_decode
from transformer.errors import UserError
from transformer.evaluate import evaluate, train_and_test
from transformer.runtime import autocast

SENTENCES = ["twenty-one", "I have three red apples.", "the nineteen small dogs", "three hundred forty-five"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def translator(tiny_run: Path) -> Translator:
    return Translator.from_checkpoint(tiny_run, device="cpu")


def test_translate_returns_strings(translator: Translator) -> None:
    many = translator.translate(SENTENCES, beam_size=2)
    assert isinstance(many, list) and len(many) == len(SENTENCES) and all(isinstance(t, str) for t in many)
    one = translator.translate(SENTENCES[1], beam_size=2)
    assert one == many[1]
    with pytest.raises(UserError, match="unknown decode option.*beam_sise"):
        translator.translate(SENTENCES, beam_sise=2)


@pytest.mark.slow
def test_translator_equals_the_decode_command(translator: Translator, tiny_run: Path, cli, tmp_path: Path) -> None:
    source = tmp_path / "source.txt"
    source.write_text("".join(s + "\n" for s in SENTENCES), encoding="utf-8")
    out, png = tmp_path / "translations.txt", tmp_path / "attention.png"
    result = cli(
        "decode",
        f"checkpoint={tiny_run}",
        f"input={source}",
        f"output={out}",
        f"plot_attention={png}",
        "device=cpu",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_text(encoding="utf-8").splitlines() == translator.translate(
        SENTENCES
    )  # both: configs/decode/beam.yaml
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert str(png) in result.stderr


def test_hypotheses_carry_scores_and_attention(translator: Translator) -> None:
    nbest = translator.hypotheses(SENTENCES, attention=True, beam_size=3, n_best=3)
    for sentence, hyps in zip(SENTENCES, nbest):
        assert len(hyps) == 3
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        n_src = len(translator.tokenizer.src_pieces(sentence))
        for h in hyps:
            assert h.attention.shape == (len(h.tokens), n_src)
            assert (h.attention >= 0).all()
            torch.testing.assert_close(h.attention.sum(-1), torch.ones(len(h.tokens)))


def test_attention_of_one_head_and_layer(translator: Translator) -> None:
    cfg = translator.models[0].cfg
    src = translator.tokenizer.encode_src([SENTENCES[1]])[0]
    tgt = translator.tokenizer.encode_tgt(["Ich habe drei rote Äpfel."])[0][1:]  # forced target, without BOS
    mean = translator.attention(src, tgt)
    heads = [
        translator.attention(src, tgt, layer=layer, head=head)
        for layer in range(cfg.n_decoder_layers)
        for head in range(cfg.n_heads)
    ]
    for weights in heads:
        assert weights.shape == (len(tgt), len(src))
        torch.testing.assert_close(weights.sum(-1), torch.ones(len(tgt)))
    torch.testing.assert_close(torch.stack(heads).mean(0), mean)  # -1 is the mean over layers and heads
    with pytest.raises(UserError, match=f"attention_head={cfg.n_heads}: the model has {cfg.n_heads} heads"):
        translator.attention(src, tgt, head=cfg.n_heads)


def test_attention_picture_from_python(translator: Translator, tmp_path: Path) -> None:
    from transformer.plots import attention_picture

    best = attention_picture(translator, SENTENCES[0], tmp_path / "a.png", layer=0, head=0)
    assert best.text == translator.translate(SENTENCES[0])
    assert (tmp_path / "a.png").read_bytes().startswith(PNG_MAGIC)


def test_train_and_evaluate_from_python(compose_cfg, tmp_path: Path) -> None:
    overrides = [
        "experiment=tiny",
        f"run_dir={tmp_path / 'run'}",
        "trainer.max_steps=2",
        "trainer.eval_every=2",
        "data.builtin_train=40",
        "data.builtin_valid=4",
        "data.builtin_test=4",
        "evaluate_test=false",
    ]
    cfg = compose_cfg("train", overrides)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        metrics = train_and_test(cfg)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert metrics["step"] == 2 and metrics["run_dir"] == cfg.run_dir
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()

    out = tmp_path / "valid.hyp.txt"
    scores = evaluate(
        cfg.run_dir,
        data=OmegaConf.to_object(cfg.data),
        split="valid",
        decode=DecodeConfig(beam_size=1),
        output=str(out),
        device="cpu",
    )
    assert scores["sentences"] == 4 and len(out.read_text(encoding="utf-8").splitlines()) == 4
    assert scores["bleu_signature"].startswith("nrefs:1|") and 0 <= scores["bleu"] <= 100


@pytest.mark.slow
def test_help_lists_the_groups(cli, tmp_path: Path) -> None:
    result = cli("train", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    groups = result.stdout.split("== Config groups", 1)[1].split("== Config ", 1)[0]
    listed = {line.split(":")[0] for line in groups.splitlines() if ":" in line}
    assert listed >= {"model", "data", "trainer", "decode", "experiment"}
    assert "model: base, small, student, tiny" in groups
    assert "README.md" in result.stdout and "transformer-train -m" in result.stdout


def test_every_config_key_has_a_comment() -> None:
    """config.py is the reference of every key: each dataclass field carries a comment, on its
    line or (where the line would pass 120 characters) on the line above."""
    import transformer.config as config_module

    source = Path(config_module.__file__).read_text(encoding="utf-8")
    lines = source.splitlines()
    undocumented = [
        f"{node.name}.{field.target.id}"
        for node in ast.parse(source).body
        if isinstance(node, ast.ClassDef) and dataclasses.is_dataclass(getattr(config_module, node.name))
        for field in node.body
        if isinstance(field, ast.AnnAssign)
        and "#" not in lines[field.end_lineno - 1]
        and not lines[field.lineno - 2].lstrip().startswith("#")
    ]
    assert undocumented == []


def forced_log_probs(translator: Translator, sentence: str, pieces: list[str], precision: str) -> torch.Tensor:
    """Teacher-forced target log-probs (T, V) of ``pieces`` after ``sentence``, under the decoder's autocast."""
    model = translator.models[0]
    ids = [translator.tokenizer.tgt.piece_to_id(p) for p in pieces]  # ends with EOS
    src = torch.tensor(translator.tokenizer.encode_src([sentence]))
    tgt = torch.tensor([[model.specials.bos] + ids[:-1]])
    with torch.inference_mode(), autocast(torch.device("cpu"), precision, "decode.precision"):
        return model(src, tgt).float().log_softmax(-1)[0]


def test_bf16_decoding_agrees_with_fp32(translator: Translator) -> None:
    """bf16 logits stay within bf16 rounding of fp32's, so greedy search under bf16 picks fp32's
    token at every step where fp32's best beats its runner-up by more than twice that bound; past
    the first closer call either precision may go its own way (the barely trained fixture has
    near-ties, and a long degenerate output accumulates them)."""
    bound, compared = 0.1, 0
    for sentence in ["twenty-one", "I have three red apples.", "We see seventy-seven red cars."]:
        fp32 = translator.hypotheses([sentence], beam_size=1, precision="fp32")[0][0]
        bf16 = translator.hypotheses([sentence], beam_size=1, precision="bf16")[0][0]
        exact = forced_log_probs(translator, sentence, fp32.tokens, "fp32")
        error = (forced_log_probs(translator, sentence, fp32.tokens, "bf16") - exact).abs()
        assert 0 < error.max() < bound  # bf16 really ran, and only rounded
        top2 = exact.topk(2, dim=-1).values
        close = (top2[:, 0] - top2[:, 1] <= 2 * bound).nonzero()
        clear = int(close[0]) if len(close) else len(fp32.tokens)
        assert bf16.tokens[:clear] == fp32.tokens[:clear]
        compared += clear
    assert compared > 0  # the fixture has at least one clear path to compare
    with pytest.raises(UserError, match="decode.precision=fp16 needs CUDA"):
        translator.translate("twenty-one", precision="fp16")
    with pytest.raises(UserError, match="decode.precision='fp8'"):
        translator.translate("twenty-one", precision="fp8")


def test_search_sizes_must_be_positive(translator: Translator) -> None:
    for key in ("beam_size", "n_best"):
        with pytest.raises(UserError, match=f"decode.{key}=0 must be >= 1"):
            translator.translate("twenty-one", **{key: 0})


@pytest.mark.parametrize("prepack", ["true", "auto"])
def test_packed_weights_decode_like_plain_linear_layers(translator: Translator, prepack: str) -> None:
    sentences = SENTENCES + ["We see seventy-seven red cars."]
    plain = translator.hypotheses(sentences, beam_size=3, n_best=3, prepack=False, precision="fp32")
    packed = translator.hypotheses(sentences, beam_size=3, n_best=3, prepack=prepack, precision="fp32")
    assert [[h.text for h in hyps] for hyps in packed] == [[h.text for h in hyps] for hyps in plain]
    assert [h.score for hyps in packed for h in hyps] == pytest.approx(
        [h.score for hyps in plain for h in hyps], abs=1e-4
    )
    cfg = translator.options(prepack=prepack, precision="fp32")
    assert translator.search_models(cfg) is translator.search_models(cfg)  # packed once, not per call
    searched = translator.search_models(cfg)
    assert pack_models(searched, resolve_decode(cfg, torch.device("cpu"))) == searched  # packing again changes nothing
    assert translator.search_models(translator.options(prepack=False, precision="fp32")) is translator.models


def test_prepack_is_a_switch(translator: Translator) -> None:
    with pytest.raises(UserError, match="decode.prepack='sometimes': expected one of auto, true, false"):
        translator.translate("twenty-one", prepack="sometimes")
