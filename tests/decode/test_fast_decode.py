"""The fast decoding paths: int8 linear layers, vocabulary shortlists, the ``auto`` choice
and the CTranslate2 serving engine, on a small model trained to translate (builtin corpus)."""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import compose_config
from transformer import Translator
from transformer.checkpoint import load_model
from transformer.config import DataConfig, DecodeConfig
from transformer.data.sources import load_split
from transformer.decode.batching import translate_ids
from transformer.decode.fast import INT8_BLEU_LOSS, resolve_shortlist
from transformer.decode.prepare import resolve_decode
from transformer.decode.shortlist import beside, build_shortlist, load_shortlist
from transformer.errors import UserError
from transformer.evaluate import score
from transformer.model.prepack import PackedLinear
from transformer.model.quantize import Int8Linear, int8_available

pytestmark = pytest.mark.skipif(not int8_available(), reason="no oneDNN int8 linear kernel in this build")

OVERRIDES = [  # a model that learns the builtin corpus in a minute on one core
    "experiment=tiny",
    "model.d_model=64",
    "model.d_ff=128",
    "model.n_encoder_layers=2",
    "model.n_decoder_layers=2",
    "data.vocab_size=300",
    "data.builtin_valid=100",
    "trainer.max_steps=300",
    "trainer.eval_every=300",
    "trainer.warmup_steps=30",
    "trainer.lr=3e-3",
    "trainer.label_smoothing=0.0",
    "evaluate_test=false",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformer.evaluate import train_and_test as train

    run_dir = tmp_path_factory.mktemp("fast_decode") / "run"
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        train(compose_config("train", [*OVERRIDES, f"run_dir={run_dir}"]))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return run_dir


@pytest.fixture(scope="module")
def translator(trained: Path) -> Translator:
    return Translator.from_checkpoint(trained, device="cpu")


@pytest.fixture(scope="module")
def valid(trained: Path) -> list[tuple[str, str]]:
    return load_split(DataConfig(**load_model(trained)[2]["data"]), "valid")


def bleu(translator: Translator, pairs: list[tuple[str, str]], **options) -> float:
    return score(translator.translate([s for s, _ in pairs], **options), [t for _, t in pairs])["bleu"]


def test_int8_linear_is_close_to_fp32_and_slices_like_it() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 300)
    x = torch.randn(2, 7, 96)
    with torch.inference_mode():
        int8 = Int8Linear(linear)
        exact, quantized = linear(x), int8(x)
        assert quantized.shape == exact.shape
        assert (quantized - exact).abs().max() < 0.02 * exact.abs().max()
        rows = torch.tensor([0, 5, 299])
        torch.testing.assert_close(int8.rows(rows)(x), quantized[..., rows], rtol=1e-5, atol=1e-5)
        packed = PackedLinear(linear, keep_source=True).rows(rows)
        torch.testing.assert_close(packed(x), F.linear(x, linear.weight[rows], linear.bias[rows]))


@pytest.mark.slow
def test_int8_search_within_the_bleu_bound(translator: Translator, valid) -> None:
    fp32 = bleu(translator, valid, beam_size=3, quantize="none", precision="fp32")
    int8 = bleu(translator, valid, beam_size=3, quantize="int8")
    assert fp32 > 20, "the fixture should translate"
    assert abs(fp32 - int8) <= INT8_BLEU_LOSS
    models = translator.search_models(translator.options(quantize="int8"))
    assert models is translator.search_models(translator.options(quantize="int8"))  # quantized once per translator
    assert any(isinstance(m, Int8Linear) for m in models[0].modules())
    assert isinstance(models[0].output, Int8Linear)  # the output projection too
    assert not any(isinstance(m, Int8Linear) for m in translator.models[0].modules())  # the model is untouched


def test_int8_needs_fp32_on_cpu(translator: Translator) -> None:
    with pytest.raises(UserError, match="decode.quantize=int8 runs on CPU in fp32"):
        translator.translate("three", quantize="int8", precision="bf16")
    with pytest.raises(UserError, match="decode.quantize='int4'"):
        translator.translate("three", quantize="int4")


def test_auto_picks_exact_paths_unless_a_loss_is_allowed(translator: Translator, trained: Path) -> None:
    model, device = translator.models[0], torch.device("cpu")
    assert resolve_decode(DecodeConfig(precision="fp32"), device, model).quantize == "none"
    allowed = resolve_decode(DecodeConfig(precision="fp32", max_bleu_loss=INT8_BLEU_LOSS), device, model)
    assert allowed.quantize in ("none", "int8")  # whichever timed faster here
    table = build_shortlist([[5, 6, 2]], [[1, 7, 2]], model.cfg.src_vocab_size, model.cfg.tgt_vocab_size, k=2)
    table.bleu_loss = 0.1
    path = beside(trained)
    torch.save(table.to_dict(), path)
    try:
        vocab = model.cfg.tgt_vocab_size
        assert resolve_shortlist(DecodeConfig(), trained, vocab) is None  # no loss allowed: exact only
        assert resolve_shortlist(DecodeConfig(max_bleu_loss=0.05), trained, vocab) is None  # costs more than allowed
        assert resolve_shortlist(DecodeConfig(max_bleu_loss=0.2), trained, vocab) is not None
        assert resolve_shortlist(DecodeConfig(shortlist="none", max_bleu_loss=1), trained, vocab) is None
    finally:
        path.unlink()


@pytest.mark.slow
def test_shortlist_command_stays_within_bound_and_never_leaves_the_list(
    trained: Path, translator: Translator, valid
) -> None:
    from transformer.cli.shortlist import main

    main([f"checkpoint={trained}", "k=8", "frequent=10", "valid_sentences=50"])
    path = beside(trained)
    assert path.is_file() and not list(path.parent.glob(".shortlist.pt.*"))  # written atomically
    table = load_shortlist(path, translator.models[0].cfg.tgt_vocab_size)
    assert table.bleu_loss is not None
    full = bleu(translator, valid, beam_size=3, shortlist="none")
    short = bleu(translator, valid, beam_size=3, shortlist=str(path))
    assert abs(full - short) <= 0.3
    model = translator.models[0]
    cfg = DecodeConfig(beam_size=3, precision="fp32", shortlist=str(path))
    for pair in valid[:10]:
        src = translator.tokenizer.encode_src([pair[0]])
        allowed = set(table.candidates(torch.tensor(src), {model.specials.eos}).tolist())
        hyps = translate_ids([model], src, replace(cfg, n_best=3))[0]
        assert all(set(h.tokens) <= allowed for h in hyps)
    assert translator.translate(valid[0][0], shortlist="auto", max_bleu_loss=50) == translator.translate(
        valid[0][0], shortlist=str(path)
    )
    path.unlink()


def test_shortlist_keeps_forced_prefix_tokens(translator: Translator) -> None:
    model = translator.models[0]
    table = build_shortlist([[5, 2]], [[7, 2]], model.cfg.src_vocab_size, model.cfg.tgt_vocab_size, k=1, frequent=0)
    prefix = translator.tokenizer.encode_tgt(["Sie haben"])[0][1:-1]
    src = translator.tokenizer.encode_src(["twenty-one"])
    cfg = DecodeConfig(beam_size=2, precision="fp32")
    hyp = translate_ids([model], src, cfg, prefixes=[prefix], shortlist=table)[0][0]
    assert hyp.tokens[: len(prefix)] == prefix
    assert set(hyp.tokens) <= set(prefix) | {7, model.specials.eos} | set(table.table[src[0]].flatten().tolist())


def test_a_bad_shortlist_is_one_error_line(translator: Translator, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="decode.shortlist=.*missing.pt: file not found"):
        translator.translate("three", shortlist=str(tmp_path / "missing.pt"))
    wrong = build_shortlist([[5, 2]], [[7, 2]], 10, 20)
    torch.save(wrong.to_dict(), tmp_path / "wrong.pt")
    with pytest.raises(UserError, match="built for a target vocabulary of 20"):
        translator.translate("three", shortlist=str(tmp_path / "wrong.pt"))


@pytest.fixture(scope="module")
def ct2_translator(trained: Path):
    pytest.importorskip("ctranslate2")
    pytest.importorskip("transformers")
    from transformer.serve.ct2_engine import CT2Translator

    return CT2Translator(trained, DECODE_CT2, threads=1)


DECODE_CT2 = DecodeConfig(lp_style="average", early_stop="fairseq", beam_size=3)  # what CTranslate2 also does


@pytest.mark.slow
def test_ct2_engine_answers_what_transformer_decode_does(ct2_translator, trained: Path, valid, cli, tmp_path) -> None:
    sources = [s for s, _ in valid[:40]]
    source = tmp_path / "source.txt"
    source.write_text("".join(s + "\n" for s in sources), encoding="utf-8")
    out = tmp_path / "out.txt"
    options = ["decode.lp_style=average", "decode.early_stop=fairseq", "decode.beam_size=3", "device=cpu"]
    result = cli("decode", f"checkpoint={trained}", f"input={source}", f"output={out}", *options, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ct2_translator.translate(sources) == out.read_text(encoding="utf-8").splitlines()
    ours = Translator.from_checkpoint(trained, device="cpu", config=DECODE_CT2)
    assert ct2_translator.translate(sources, beam_size=1) == ours.translate(sources, beam_size=1)
    assert (trained / "checkpoints" / "best.ct2").is_dir()  # the conversion is cached beside the checkpoint
    theirs, mine = ct2_translator.hypotheses(sources[:3], n_best=2), ours.hypotheses(sources[:3], n_best=2)
    for a, b in zip(theirs, mine):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-3)


def test_ct2_engine_refuses_what_it_cannot_do_naming_the_field(ct2_translator) -> None:
    from transformer.serve.api import ApiError, TranslateRequest, decode_options
    from transformer.serve.ct2_engine import CT2Translator

    with pytest.raises(ApiError) as refused:
        decode_options(ct2_translator, TranslateRequest(text="three", alignment=True), None)
    assert refused.value.status == 422 and refused.value.field == "alignment"
    with pytest.raises(UserError, match="decode.constraints"):
        ct2_translator.hypotheses(["three"], constraints=[["drei"]])
    with pytest.raises(UserError, match="decode.prefix=Ich: serve.engine=ctranslate2 does not support forced"):
        ct2_translator.hypotheses(["three"], prefix="Ich")
    with pytest.raises(UserError, match="decode.lp_style=gnmt: serve.engine=ctranslate2 does not support"):
        CT2Translator(ct2_translator.checkpoint, DecodeConfig())


def test_served_model_on_the_ct2_engine(ct2_translator, trained: Path) -> None:
    from transformer.serve.models import load_served_model

    served = load_served_model("", str(trained), "cpu", DECODE_CT2, engine="ctranslate2")
    assert type(served.translator).__name__ == "CT2Translator"
    texts = [hyps[0].text for hyps in served.decode(["twenty-one", "three"], DECODE_CT2, False)]
    assert texts == ct2_translator.translate(["twenty-one", "three"])
    assert served.info["parameters"] == ct2_translator.models[0].num_parameters()
