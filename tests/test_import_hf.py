"""Imports are exact: a random OPUS-MT-style MarianMTModel and an M2M100 model, written
locally, give transformers' logits, greedy and beam outputs and token ids after import;
import -> export -> import changes nothing; a fine-tune starts from the import and resumes
exactly; a broken directory is one error line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from conftest import compose_config  # noqa: E402
from hf_models import write_m2m100, write_marian  # noqa: E402
from transformer.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from transformer.cli.import_hf import main  # noqa: E402
from transformer.config import DecodeConfig  # noqa: E402
from transformer.data.batching import pad  # noqa: E402
from transformer.decode.translator import Translator, translate_ids  # noqa: E402
from transformer.errors import UserError  # noqa: E402
from transformer.export import export  # noqa: E402
from transformer.import_hf import import_directory, import_hf  # noqa: E402
from transformer.train import loop  # noqa: E402
from transformer.train.init import init_from  # noqa: E402

MAX_LEN = 24  # generated tokens including EOS (HF max_length = MAX_LEN + 1 with the start token)
SENTENCES = [
    "We see seventy-seven red cars .",
    "three hundred forty-five",
    ">>deu<< twenty-one apples",
    "the nineteen small dogs",
    "two",
]


@pytest.fixture(scope="module")
def marian(tmp_path_factory):
    """(HF directory, our checkpoint path) of a random OPUS-MT-like model."""
    root = tmp_path_factory.mktemp("marian")
    directory = write_marian(root / "hf")
    return directory, import_hf(str(directory), str(root / "imported.pt"))


@pytest.fixture(scope="module")
def marian_separate(tmp_path_factory):
    """An OPUS-MT model with separate vocabularies (vocab.json, target_vocab.json)."""
    root = tmp_path_factory.mktemp("marian_separate")
    directory = write_marian(root / "hf", separate=True, seed=1)
    # (seed 0: its best beams run into the length limit, where HF scores the forced EOS as log-prob 0
    # and we keep the model's, so the two pick different beams there)
    return directory, import_hf(str(directory), str(root / "imported.pt"))


@pytest.fixture(scope="module")
def m2m(tmp_path_factory):
    root = tmp_path_factory.mktemp("m2m")
    directory = write_m2m100(root / "hf")
    return directory, import_hf(str(directory), str(root / "imported.pt"), "en", "de")


def loaded(checkpoint: Path):
    model, tokenizer = model_from_checkpoint(load_checkpoint(checkpoint))
    return model.eval(), tokenizer


def hf_model(directory: Path):
    return transformers.AutoModelForSeq2SeqLM.from_pretrained(str(directory)).eval()


def hf_generate(directory: Path, src: torch.Tensor, model, **settings) -> list[list[int]]:
    """transformers' outputs as our hypotheses' tokens (start token and padding removed)."""
    s = model.specials
    forced = dict(forced_bos_token_id=s.forced_bos) if s.forced_bos >= 0 else {}
    with torch.no_grad():
        out = hf_model(directory).generate(
            input_ids=src,
            attention_mask=(src != s.pad).long(),
            do_sample=False,
            max_length=MAX_LEN + 1,
            suppress_tokens=list(s.never_generated),
            forced_eos_token_id=s.eos,
            **forced,
            **settings,
        )
    rows = [row[1:] for row in out.tolist()]
    return [row[: row.index(s.eos) + 1] if s.eos in row else row for row in rows]


def test_marian_config_follows_opus_conventions(marian):
    directory, checkpoint = marian
    cfg = loaded(checkpoint)[0].cfg
    vocab = json.loads((directory / "vocab.json").read_text())
    assert (cfg.activation, cfg.norm_first, cfg.positional, cfg.final_logits_bias) == (
        "silu",
        False,
        "sinusoidal",
        True,
    )
    assert (cfg.pad_id, cfg.bos_id, cfg.eos_id) == (len(vocab) - 1, len(vocab) - 1, 0)


@pytest.mark.parametrize("which", ["marian", "marian_separate", "m2m"])
def test_logits_equal_transformers(which, request):
    directory, checkpoint = request.getfixturevalue(which)
    model, tokenizer = loaded(checkpoint)
    src = pad(tokenizer.encode_src(SENTENCES), model.cfg.pad_id)
    tgt = pad(
        [ids[:-1] for ids in tokenizer.encode_tgt(["drei rote Autos", "zwei", "neunzehn kleine Hunde sehen"] * 2)[:5]],
        model.cfg.pad_id,
    )
    with torch.no_grad():
        ours = model(src, tgt)
        theirs = hf_model(directory)(
            input_ids=src, attention_mask=(src != model.cfg.pad_id).long(), decoder_input_ids=tgt
        ).logits
    real = tgt != model.cfg.pad_id  # M2M100 gives padded target positions no position: only real ones count
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("which", ["marian", "marian_separate", "m2m"])
def test_greedy_and_beam_equal_generate(which, request):
    """HF's beam score is log-prob / length ** length_penalty and early_stopping=True stops
    at num_beams finished: our lp_style=average with early_stop=fairseq."""
    directory, checkpoint = request.getfixturevalue(which)
    model, tokenizer = loaded(checkpoint)
    ids = tokenizer.encode_src(SENTENCES)
    src = pad(ids, model.cfg.pad_id)
    greedy = translate_ids([model], ids, DecodeConfig(beam_size=1, max_len_a=0, max_len_b=MAX_LEN, precision="fp32"))
    assert [h[0].tokens for h in greedy] == hf_generate(directory, src, model, num_beams=1)
    cfg = DecodeConfig(
        beam_size=4,
        lp_style="average",
        length_penalty=1.0,
        early_stop="fairseq",
        max_len_a=0,
        max_len_b=MAX_LEN,
        precision="fp32",
    )
    beam = [h[0].tokens for h in translate_ids([model], ids, cfg)]
    assert beam == hf_generate(directory, src, model, num_beams=4, length_penalty=1.0, early_stopping=True)
    assert len({len(t) for t in beam}) > 1 and max(map(len, beam)) > 3  # varied outputs, not one token


@pytest.mark.parametrize("which", ["marian", "marian_separate"])
def test_marian_tokenizer_round_trip(which, request):
    directory, checkpoint = request.getfixturevalue(which)
    _, tokenizer = loaded(checkpoint)
    hf_tok = transformers.MarianTokenizer.from_pretrained(str(directory))
    sentences = SENTENCES + ["Ünïcödé ☃ unknown"]
    assert tokenizer.encode_src(sentences) == hf_tok(sentences)["input_ids"]
    targets = ["drei rote Autos", "neunzehn kleine Hunde"]
    labels = hf_tok(text_target=targets)["input_ids"]
    assert [ids[1:] for ids in tokenizer.encode_tgt(targets)] == labels
    assert tokenizer.decode_tgt(labels) == hf_tok.batch_decode(labels, skip_special_tokens=True)
    assert tokenizer.src_pieces(">>deu<< two")[0] == ">>deu<<"  # the target-language tag is one piece


def test_m2m100_tokenizer_adds_language_tokens(m2m):
    directory, checkpoint = m2m
    model, tokenizer = loaded(checkpoint)
    hf_tok = transformers.M2M100Tokenizer.from_pretrained(str(directory), src_lang="en", tgt_lang="de")
    assert tokenizer.encode_src(SENTENCES[:2]) == hf_tok(SENTENCES[:2])["input_ids"]
    labels = hf_tok(text_target=["drei rote Autos"])["input_ids"]
    assert [ids[1:] for ids in tokenizer.encode_tgt(["drei rote Autos"])] == labels
    assert model.cfg.forced_bos_id == hf_tok.get_lang_id("de") == labels[0][0]
    assert tokenizer.decode_tgt(labels) == hf_tok.batch_decode([row[1:] for row in labels], skip_special_tokens=True)


@pytest.mark.parametrize("which", ["marian", "marian_separate", "m2m"])
def test_import_export_import_is_identical(which, request, tmp_path):
    directory, checkpoint = request.getfixturevalue(which)
    first = load_checkpoint(checkpoint)
    again = import_directory(export(str(checkpoint), str(tmp_path / "exported")))
    assert again["model_config"] == first["model_config"]
    assert again["tokenizer"] == first["tokenizer"]
    assert again["model"].keys() == first["model"].keys()
    assert all(torch.equal(again["model"][k], first["model"][k]) for k in first["model"])


def test_translator_from_pretrained_decodes_the_directory(marian):
    directory, checkpoint = marian
    ours = Translator.from_pretrained(directory).translate(SENTENCES[:2], beam_size=1)
    assert ours == Translator.from_checkpoint(checkpoint).translate(SENTENCES[:2], beam_size=1)


def fine_tune(run_dir: Path, checkpoint: Path, *overrides: str):
    return compose_config(
        "train",
        [
            "experiment=tiny",
            "evaluate_test=false",
            f"run_dir={run_dir}",
            f"trainer.init_from={checkpoint}",
            "trainer.log_every=1",
            "trainer.eval_every=1000",
            "trainer.schedule=constant",
            "data.builtin_train=200",
            *overrides,
        ],
    )


@pytest.mark.slow
def test_fine_tune_starts_from_the_import_and_resumes_exactly(marian, tmp_path):
    _, checkpoint = marian
    full, split = tmp_path / "full", tmp_path / "split"
    loop.train(fine_tune(full, checkpoint, "trainer.max_steps=6"))
    loop.train(fine_tune(split, checkpoint, "trainer.max_steps=3"))
    start = load_checkpoint(split / "checkpoints/last.pt")
    assert start["tokenizer"] == load_checkpoint(checkpoint)["tokenizer"]  # no new BPE
    assert start["model_config"] == load_checkpoint(checkpoint)["model_config"]
    loop.train(fine_tune(split, checkpoint, "trainer.max_steps=6", f"trainer.resume={split}"))
    a, b = (
        load_checkpoint(full / "checkpoints/last.pt")["model"],
        load_checkpoint(split / "checkpoints/last.pt")["model"],
    )
    assert all(torch.equal(a[k], b[k]) for k in a)

    def records(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]

    assert records(full) == records(split) and len(records(full)) == 6
    imported = load_checkpoint(checkpoint)["model"]
    assert not all(torch.equal(imported[k], a[k]) for k in a)  # it trained


def test_model_overrides_that_contradict_the_checkpoint_are_an_error(marian, tmp_path):
    _, checkpoint = marian
    cfg = fine_tune(tmp_path, checkpoint, "model.d_model=64", "model.dropout=0.2")
    with pytest.raises(UserError, match="model.d_model=64 contradicts trainer.init_from"):
        init_from(cfg, ["model.d_model=64"])
    _, model = init_from(cfg, ["model.dropout=0.2"])  # regularisation may change
    assert (model.d_model, model.dropout, model.activation) == (32, 0.2, "silu")
    assert cfg.model.d_model == 64  # the run's config is rebuilt with the checkpoint's model, never edited


def broken(directory: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(directory, copy)
    edit(copy)
    return copy


def edit_config(**changes):
    def edit(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(config | changes))

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: (d / "config.json").unlink(), "no config.json"),
        (edit_config(encoder_ffn_dim=48, decoder_ffn_dim=48), "wrong shapes"),
        (edit_config(activation_function="gelu_new"), "activation_function='gelu_new'"),
        (edit_config(add_bias_logits=True), "add_bias_logits=True"),
        (edit_config(normalize_embedding=True), "normalize_embedding=True"),
        (lambda d: (d / "model.safetensors").write_bytes(b"junk"), "unreadable weights"),
        (
            lambda d: (d / "config.json").write_text(
                json.dumps({k: v for k, v in json.loads((d / "config.json").read_text()).items() if k != "d_model"})
            ),
            "no d_model field",
        ),
        (edit_config(model_type="bart"), "model_type='bart'"),
    ],
)
def test_broken_directory_is_one_error_line(marian, tmp_path, capsys, edit, message):
    directory, _ = marian
    with pytest.raises(SystemExit) as exit_info:
        main([f"hf={broken(directory, tmp_path, edit)}", f"output={tmp_path / 'x.pt'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()


def test_hub_names_are_not_looked_up_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit):
        main(["hf=Helsinki-NLP/opus-mt-en-de", f"output={tmp_path / 'x.pt'}"])
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([f"hf={tmp_path / 'missing'}", f"output={tmp_path / 'x.pt'}"])
    err = capsys.readouterr().err.strip()
    assert err.endswith("missing: no such directory") and len(err.splitlines()) == 1


@pytest.mark.slow
def test_train_cli_names_the_contradicting_key(marian, tmp_path, cli):
    _, checkpoint = marian
    done = cli(
        "train",
        "experiment=tiny",
        f"trainer.init_from={checkpoint}",
        "model.n_heads=2",
        f"run_dir={tmp_path / 'run'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "error: model.n_heads=2 contradicts trainer.init_from" in done.stderr


def test_checkpoints_without_the_new_model_keys_still_load():
    """Checkpoints written before the import options existed get their defaults (ids 0-3,
    embeddings scaled, no logits bias) and compute what they computed."""
    from tiny import random_sources, tiny_model, tiny_tokenizer
    from transformer.checkpoint import FORMAT

    tokenizer = tiny_tokenizer()
    model = tiny_model(vocab=tokenizer.src_vocab_size)
    new_keys = ("scale_embedding", "final_logits_bias", "pad_id", "bos_id", "eos_id", "forced_bos_id")
    old_config = {k: v for k, v in vars(model.cfg).items() if k not in new_keys}
    old = {"format": FORMAT, "model": model.state_dict(), "model_config": old_config, "tokenizer": tokenizer.to_state()}
    reloaded = model_from_checkpoint(old)[0].eval()
    src, tgt = pad(random_sources([5, 3], vocab=tokenizer.src_vocab_size)), torch.tensor([[2, 7, 9], [2, 5, 4]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(src, tgt), model(src, tgt), atol=0, rtol=0)
