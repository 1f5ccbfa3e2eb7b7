"""Exports are exact: the transformers model (read back from disk) gives our logits and finds
our greedy and beam translations token for token; CTranslate2's conversion of it finds our
greedy translations; combinations that cannot be exported say what to change."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from tiny import eos_prone, padded, random_sources, tiny_model, tiny_tokenizer  # noqa: E402
from transformer.checkpoint import FORMAT  # noqa: E402
from transformer.cli.export import main  # noqa: E402
from transformer.config import DecodeConfig  # noqa: E402
from transformer.decode.batching import translate_ids  # noqa: E402
from transformer.errors import UserError  # noqa: E402
from transformer.export import convert_ct2, to_hf  # noqa: E402
from transformer.vocab import BOS, EOS, PAD  # noqa: E402

MAX_LEN = 24  # generated tokens including EOS (HF: max_length = MAX_LEN + 1, counting the start token)
STYLES = {"marian": dict(norm_first=False), "m2m100": dict(norm_first=True, tie_output=False, activation="gelu")}
EOS_BOOST = {"marian": 2.0, "m2m100": 1.5}  # beams of a few tokens that end before MAX_LEN
HF_CLASS = {"marian": "MarianMTModel", "m2m100": "M2M100ForConditionalGeneration"}


@pytest.fixture(scope="module", params=list(STYLES))
def exported(request, tmp_path_factory):
    """(style, our model, its sources, the export directory) written by the console entry point."""
    tokenizer = tiny_tokenizer()
    model = eos_prone(tiny_model(vocab=tokenizer.src_vocab_size, **STYLES[request.param]), EOS_BOOST[request.param])
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = root / "model.pt"
    torch.save(
        {
            "format": FORMAT,
            "model": model.state_dict(),
            "model_config": asdict(model.cfg),
            "tokenizer": tokenizer.to_state(),
        },
        checkpoint,
    )
    main([f"checkpoint={checkpoint}", f"output={root / 'hf'}", "beam_size=4", f"max_length={MAX_LEN + 1}"])
    sources = random_sources([7, 3, 12, 5, 9, 2], vocab=tokenizer.src_vocab_size)
    return request.param, model, tokenizer, sources, root / "hf"


def hf_model(directory: Path):
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(directory))
    return model.eval()


def generated(sequences: torch.Tensor) -> list[list[int]]:
    """HF output rows (start token, tokens, EOS, PAD...) as our hypotheses' token lists."""
    out = []
    for row in sequences.tolist():
        row = row[1:]
        out.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return out


def test_loads_as_the_right_class_with_our_ids(exported):
    style, model, _, _, directory = exported
    hf = hf_model(directory)
    assert type(hf).__name__ == HF_CLASS[style]
    gen = hf.generation_config
    assert (gen.decoder_start_token_id, gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (BOS, BOS, EOS, PAD)
    assert (gen.num_beams, gen.max_length) == (4, MAX_LEN + 1)


def test_logits_match_on_a_padded_batch(exported):
    _, model, _, sources, directory = exported
    hf = hf_model(directory)
    src = padded(sources)
    tgt = torch.cat(
        [torch.full((len(sources), 1), BOS), torch.randint(EOS + 1, model.cfg.tgt_vocab_size, (len(sources), 6))], dim=1
    )
    with torch.no_grad():
        ours = model(src, tgt)
        theirs = hf(input_ids=src, attention_mask=(src != PAD).long(), decoder_input_ids=tgt).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_generate_greedy_equals_our_greedy(exported):
    _, model, _, sources, directory = exported
    ours = translate_ids([model], sources, DecodeConfig(beam_size=1, max_len_a=0, max_len_b=MAX_LEN, precision="fp32"))
    src = padded(sources)
    with torch.no_grad():
        theirs = hf_model(directory).generate(
            input_ids=src, attention_mask=(src != PAD).long(), num_beams=1, do_sample=False
        )
    assert generated(theirs) == [h[0].tokens for h in ours]


def test_generate_beam_equals_our_beam(exported):
    """HF scores log-prob / generated length ** length_penalty and, with early_stopping=True,
    stops at num_beams finished hypotheses: our lp_style=average, early_stop=fairseq."""
    _, model, _, sources, directory = exported
    cfg = DecodeConfig(
        beam_size=4,
        lp_style="average",
        length_penalty=1.0,
        early_stop="fairseq",
        max_len_a=0,
        max_len_b=MAX_LEN,
        precision="fp32",
    )
    ours = [h[0] for h in translate_ids([model], sources, cfg)]
    # HF gives a forced EOS log-prob 0 where we keep the model's: compare where no beam needed it.
    assert all(len(h.tokens) < MAX_LEN for h in ours)
    assert max(len(h.tokens) for h in ours) > 2
    src = padded(sources)
    with torch.no_grad():
        out = hf_model(directory).generate(
            input_ids=src,
            attention_mask=(src != PAD).long(),
            num_beams=4,
            length_penalty=1.0,
            early_stopping=True,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert generated(out.sequences) == [h.tokens for h in ours]
    assert out.sequences_scores.tolist() == pytest.approx([h.score for h in ours], abs=1e-4)


def test_tokenizer_round_trip(exported):
    _, _, tokenizer, _, directory = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(directory))
    sentences = ["three hundred forty-five", "We see seventy-seven red cars ."]
    assert hf_tok(sentences)["input_ids"] == tokenizer.encode_src(sentences)
    targets = [ids[1:] for ids in tokenizer.encode_tgt(["dreihundertfünfundvierzig rote Autos"])]
    assert hf_tok.batch_decode(targets, skip_special_tokens=True) == tokenizer.decode_tgt(targets)


def test_ctranslate2_greedy_equals_our_greedy(exported, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")
    _, model, tokenizer, sources, directory = exported
    ours = translate_ids([model], sources, DecodeConfig(beam_size=1, max_len_a=0, max_len_b=MAX_LEN, precision="fp32"))
    translator = ctranslate2.Translator(str(convert_ct2(directory, tmp_path / "ct2")), device="cpu", intra_threads=1)
    pieces = [[tokenizer.src.id_to_piece(i) for i in ids] for ids in sources]
    # CTranslate2 stops at its limit without forcing EOS: compare the tokens before EOS.
    results = translator.translate_batch(
        pieces,
        beam_size=1,
        max_decoding_length=MAX_LEN - 1,
        min_decoding_length=0,
        suppress_sequences=[["<pad>"], ["<s>"]],
    )
    theirs = [[tokenizer.tgt.piece_to_id(p) for p in r.hypotheses[0]] for r in results]
    assert theirs == [h[0].tokens[:-1] for h in ours]


@pytest.mark.parametrize(
    "overrides, hint",
    [
        (dict(positional="learned"), "positional=learned"),
        (dict(positional="sinusoidal_fairseq"), "post-norm"),
        (dict(norm_first=True, positional="sinusoidal"), "pre-norm"),
        (dict(norm_first=True, share_embeddings=False, src_vocab_size=20), "share_embeddings=true"),
    ],
)
def test_unsupported_combinations_say_what_to_change(overrides, hint):
    with pytest.raises(UserError, match=hint):
        to_hf(tiny_model(**overrides))


def test_cli_reports_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["checkpoint=x.pt"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "missing mandatory value: output" in err and len(err.strip().splitlines()) == 1
