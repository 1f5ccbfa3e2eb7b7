"""Multilingual training: several corpora (data.corpora), target-language tags
(data.tgt_lang_tag), temperature sampling over corpora, per-pair validation and test BLEU,
and decoding into a chosen language (decode.tgt_lang)."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import compose_config
from training import QUICK, TINY_MODEL
from transformer.config import DataConfig, missing_keys, to_dict
from transformer.data.builtin import builtin_splits
from transformer.data.multilingual import corpora, corpus_shares, epoch_indices, tag_prefix
from transformer.data.sources import source_for
from transformer.data.tokenizer import Tokenizer, build_tokenizer
from transformer.decode.translator import Translator
from transformer.errors import UserError
from transformer.report import hydra_value, write_run_report
from transformer.train import loop
from transformer.train.distributed import Dist
from transformer.train.examples import RunData
from transformer.vocab import BOS, EOS

PAIRS = builtin_splits(200, 20, 20, 1234)["train"]
SMALL_DATA = ["data.builtin_train=300", "data.builtin_valid=20", "data.builtin_test=20", "data.vocab_size=200"]
BOTH_WAYS = "data.corpora=[{src_lang:en,tgt_lang:de},{src_lang:en,tgt_lang:de,reverse:true}]"


def data_cfg(*overrides: str):
    return compose_config("train", ["experiment=tiny", *overrides]).data


def one_line_error(match: str):
    """pytest.raises for a UserError of one line matching ``match``."""
    return pytest.raises(UserError, match=match)


# tags in the tokenizer -----------------------------------------------------------------


def test_tags_are_whole_pieces_kept_out_of_decoded_text_and_carried_by_the_checkpoint_state() -> None:
    tok = build_tokenizer(PAIRS, 200, True, 1000, ["de", "en"])
    assert tok.languages == ["de", "en"] and tok.tags == {"de": EOS + 1, "en": EOS + 2}
    assert "<2de>" in tok.src.encode("<2de> twenty-one", out_type=str)  # never split
    sentence = "Wir sehen siebenundsiebzig rote Autos."
    ids = tok.encode_tgt([sentence])[0]
    assert tok.decode_tgt([[BOS, tok.tags["de"], *ids[1:]]]) == [sentence]  # a tag never reaches the text
    assert Tokenizer.from_state(tok.to_state()).tags == tok.tags  # decode needs nothing else
    separate = build_tokenizer(PAIRS, 200, False, 1000, ["de"])
    assert separate.tags == {"de": EOS + 1} and separate.tgt_tags == set()  # tags live in the source model
    plain = build_tokenizer(PAIRS, 200, True, 1000)
    assert plain.tags == {} and plain.languages == []


def test_tag_prefix_picks_the_language_or_says_which_exist() -> None:
    tagged, plain = build_tokenizer(PAIRS, 200, True, 1000, ["de", "en"]), build_tokenizer(PAIRS, 200, True, 1000)
    assert tag_prefix(tagged, "en") == [tagged.tags["en"]]
    with one_line_error(r"^this model translates into de, en: pick one with decode.tgt_lang=LANG$"):
        tag_prefix(tagged, None)
    with one_line_error(r"^decode.tgt_lang='fr': the model knows de, en$"):
        tag_prefix(tagged, "fr")
    assert tag_prefix(plain, None) == []  # a model without tags decodes as it always did
    with one_line_error(r"decode.tgt_lang='de': the model knows no tagged languages"):
        tag_prefix(plain, "de")
    single = build_tokenizer(PAIRS, 200, True, 1000, ["de"])
    assert tag_prefix(single, None) == [single.tags["de"]]  # one language: no choice to make


# sampling over corpora -----------------------------------------------------------------


def test_temperature_one_is_proportional_and_larger_temperatures_flatten() -> None:
    assert corpus_shares([900, 100], 1.0) == pytest.approx([0.9, 0.1])
    t5 = corpus_shares([900, 100], 5.0)
    assert t5 == pytest.approx(np.array([900, 100]) ** 0.2 / (900**0.2 + 100**0.2))
    assert 0.1 < t5[1] < corpus_shares([900, 100], 50.0)[1] < 0.5
    assert np.array_equal(epoch_indices([900, 100], 1.0, seed=1, epoch=3), np.arange(1000))  # every example once


def test_sampled_epochs_draw_the_shares_reproducibly() -> None:
    sizes = [900, 100]
    drawn = epoch_indices(sizes, 5.0, seed=1, epoch=0)
    counts = np.bincount(drawn >= 900, minlength=2)
    assert counts.tolist() == np.rint(corpus_shares(sizes, 5.0) * 1000).astype(int).tolist()
    small = drawn[drawn >= 900]
    assert np.all(np.bincount(small - 900, minlength=100) >= counts[1] // 100)  # repeats whole, then a sample
    big = drawn[drawn < 900]
    assert len(np.unique(big)) == len(big)  # a corpus drawn below its size: a subset, no repeats
    assert np.array_equal(drawn, epoch_indices(sizes, 5.0, seed=1, epoch=0))  # a pure function of (seed, epoch)
    assert not np.array_equal(drawn, epoch_indices(sizes, 5.0, seed=1, epoch=1))
    assert not np.array_equal(drawn, epoch_indices(sizes, 5.0, seed=2, epoch=0))


# corpus entries --------------------------------------------------------------------------


def test_entries_start_from_the_top_level_keys_or_a_preset_and_share_the_tokenizer_keys() -> None:
    d = data_cfg(
        "data.builtin_train=123",
        "data.vocab_size=300",
        "data.corpora=[{src_lang:en,tgt_lang:de},{preset:multi30k,reverse:true,name:m30k}]",
    )
    first, second = corpora(d)
    assert (first.pair, first.cfg.source, first.cfg.builtin_train, first.cfg.name) == (
        "en-de",
        "builtin",
        123,
        "builtin[0]",
    )
    assert (second.pair, second.cfg.source, second.cfg.name, second.reverse) == ("de-en", "files", "m30k", True)
    assert second.cfg.train_src.endswith("train.en.gz")  # the preset's files, read reversed
    assert first.cfg.vocab_size == second.cfg.vocab_size == 300  # multi30k.yaml's 8000 does not apply
    assert corpora(data_cfg()) == []  # the default: one corpus on its own path


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["data.corpora=[{tgt_lang:de}]"], r"^data.corpora\[0\]: no src_lang; each corpus names its languages"),
        (["data.corpora=[{src_lang:en,tgt_lang:de},{src_lang:de}]"], r"^data.corpora\[1\]: no tgt_lang"),
        (["data.corpora=[{src_lang:en,tgt_lang:de,vocab_size:9}]"], r"^data.corpora\[0\].vocab_size: shared by every"),
        (["data.corpora=[{src_lang:en,tgt_lang:de,source:bogus}]"], r"^data.corpora\[0\]: data.source='bogus'"),
        (["data.corpora=[{preset:bogus,src_lang:en,tgt_lang:de}]"], r"preset='bogus': expected one of builtin, files"),
        (["data.sampling_temperature=0"], r"^data.sampling_temperature=0.0 must be > 0$"),
        ([BOTH_WAYS, "data.streaming=true"], r"^data.streaming reads one corpus"),
    ],
)
def test_bad_corpus_entries_fail_in_one_line(overrides: list[str], match: str) -> None:
    with pytest.raises(UserError, match=match) as err:
        source_for(data_cfg(*overrides))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "cause"),
    [
        ("data.corpora=[{src_lang:en,tgt_lang:de,bogus:1}]", "Key 'bogus' not in 'CorpusEntry'"),
        ("data.corpora=[{src_lang:en,tgt_lang:de,reverse:maybe}]", "Value 'maybe' is not a valid bool"),
        ("data.corpora=[en]", "full_key: data.corpora[0]"),
    ],
)
def test_entries_are_checked_by_the_schema_when_composed(override: str, cause: str) -> None:
    with pytest.raises(ConfigCompositionException, match="data.corpora") as err:
        data_cfg(override)
    assert cause in str(err.value.__cause__)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("en", r"^data.corpora\[0\]: expected a mapping"),
        ({"src_lang": "en", "tgt_lang": "de", "bogus": 1}, r"^data.corpora\[0\]: .*bogus"),
    ],
)
def test_entries_built_in_python_are_checked_in_one_line(entry: object, match: str) -> None:
    with one_line_error(match) as err:
        corpora(DataConfig(corpora=[entry]))
    assert "\n" not in str(err.value)


def test_keys_an_entry_leaves_to_its_preset_are_not_keys_to_give() -> None:
    cfg = compose_config("train", ["experiment=tiny", BOTH_WAYS, "data.hub_name='???'"])
    assert OmegaConf.is_missing(cfg.data.corpora[0], "vocab_size")  # unset in the entry: the top level's
    assert missing_keys(cfg) == ["data.hub_name"]


def test_an_explicit_null_in_an_entry_differs_from_a_key_not_given() -> None:
    d = data_cfg(
        "data.corpora=[{preset:hub,src_lang:en,tgt_lang:de},{preset:hub,src_lang:en,tgt_lang:de,translation_field:null}]"
    )
    given, nulled = corpora(d)
    assert (given.cfg.translation_field, nulled.cfg.translation_field) == ("translation", None)
    assert to_dict(d)["corpora"][1] == {"preset": "hub", "src_lang": "en", "tgt_lang": "de", "translation_field": None}


def test_bidirectional_epochs_and_corpora_do_not_mix(tmp_path: Path) -> None:
    cfg = compose_config(
        "train", ["experiment=tiny", BOTH_WAYS, "trainer.bidirectional_epochs=1", f"run_dir={tmp_path}"]
    )
    with pytest.raises(UserError, match="reverse: true"):
        RunData(cfg, Dist(), None)


def test_corpora_are_tagged_and_validation_is_grouped_by_pair(tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        ["experiment=tiny", BOTH_WAYS, "data.tgt_lang_tag=true", "data.valid_max_sentences=5", f"run_dir={tmp_path}"],
    )
    data = RunData(cfg, Dist(), None)
    tags = data.tokenizer.tags
    assert data.sizes and len(data.train_examples) == sum(data.sizes)
    first = {e.src[0] for e in data.train_examples[: data.sizes[0]]}
    second = {e.src[0] for e in data.train_examples[data.sizes[0] :]}
    assert first == {tags["de"]} and second == {tags["en"]}
    assert data.valid_groups == {"en-de": list(range(5)), "de-en": list(range(5, 10))}
    assert [ids[0] for ids in data.valid_source_ids] == [tags["de"]] * 5 + [tags["en"]] * 5
    assert data.valid_sources[5] == data.valid_refs[0]  # the same sentences, read reversed


def test_one_corpus_with_tags_is_tagged_alone(tmp_path: Path) -> None:
    data = RunData(
        compose_config("train", ["experiment=tiny", "data.tgt_lang_tag=true", f"run_dir={tmp_path}"]), Dist(), None
    )
    assert data.tokenizer.languages == ["de"] and len(data.sizes) == 1
    assert {e.src[0] for e in data.train_examples} == {data.tokenizer.tags["de"]}
    assert data.valid_groups == {"en-de": list(range(len(data.valid_sources)))}


def test_a_tokenizer_without_the_tags_is_refused(tmp_path: Path) -> None:
    cfg = compose_config("train", ["experiment=tiny", BOTH_WAYS, "data.tgt_lang_tag=true", f"run_dir={tmp_path}"])
    build_tokenizer(PAIRS, 200, True, 1000).save(tmp_path)  # as a run directory holding an untagged spm.model
    with pytest.raises(
        UserError, match=r"^data.tgt_lang_tag: the run's tokenizer has no tag <2de> for en-de \(it has none"
    ):
        RunData(cfg, Dist(), None)


def test_two_corpora_resume_exactly(tmp_path: Path) -> None:
    common = [
        "experiment=tiny",
        "evaluate_test=false",
        "data.tgt_lang_tag=true",
        "data.sampling_temperature=5",
        "data.corpora=[{src_lang:en,tgt_lang:de},{src_lang:en,tgt_lang:de,reverse:true,builtin_train:60}]",
        "trainer.log_every=1",
        "trainer.eval_every=1000",
        "trainer.schedule=constant",
        "trainer.precision=fp32",
    ]
    full, split = tmp_path / "full", tmp_path / "split"
    loop.train(compose_config("train", [*common, "trainer.max_steps=20", f"run_dir={full}"]))
    loop.train(compose_config("train", [*common, "trainer.max_steps=7", f"run_dir={split}"]))
    loop.train(
        compose_config("train", [*common, "trainer.max_steps=20", f"run_dir={split}", f"trainer.resume={split}"])
    )
    assert losses(split) == losses(full)
    assert losses(full)[-1][1] >= 1  # crossed an epoch boundary
    a, b = (torch.load(r / "checkpoints/last.pt", weights_only=True)["model"] for r in (full, split))
    assert all(torch.equal(a[k], b[k]) for k in a)


def losses(run_dir: Path) -> list[tuple[int, int, float]]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines())
    return [(r["step"], r["epoch"], r["loss"]) for r in records if "loss" in r]


# the builtin_both_ways experiment ------------------------------------------------------------


@pytest.fixture(scope="module")
def both_ways_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("both_ways") / "run"
    overrides = [
        "experiment=builtin_both_ways",
        *TINY_MODEL,
        *SMALL_DATA,
        *QUICK,
        "data.max_tokens=1024",
        "trainer.max_steps=100",
        "trainer.eval_every=50",
        "trainer.lr=5e-3",
        "decode=greedy",
        f"run_dir={run}",
    ]
    cfg = compose_config("train", overrides)
    from transformer.evaluate import train_and_test as train

    write_run_report(run, cfg, train(cfg))
    return run


def words(texts: Sequence[str]) -> set[str]:
    return {w for t in texts for w in re.findall(r"\w+", t.lower())}


@pytest.mark.slow
def test_both_ways_decodes_into_the_language_its_tag_names(both_ways_run: Path) -> None:
    translator = Translator.from_checkpoint(both_ways_run, device="cpu")
    assert translator.tokenizer.languages == ["de", "en"]
    test = builtin_splits(300, 20, 20, 1234)["test"]
    english, german = words(s for s, _ in PAIRS) - words(t for _, t in PAIRS), words(t for _, t in PAIRS)
    into_de = translator.translate([s for s, _ in test], tgt_lang="de")
    into_en = translator.translate([t for _, t in test], tgt_lang="en")
    assert len(words(into_de) & german) > 2 * len(words(into_de) & english)
    assert len(words(into_en) & english) > 2 * len(words(into_en) & german)
    same_source = translator.translate([s for s, _ in test], tgt_lang="en")
    assert same_source != into_de  # the tag, not the source alone, decides
    with one_line_error("pick one with decode.tgt_lang"):
        translator.translate("twenty-one")
    with one_line_error(r"decode.tgt_lang='fr': the model knows de, en"):
        translator.translate("twenty-one", tgt_lang="fr")


def test_both_ways_records_bleu_per_pair(both_ways_run: Path) -> None:
    records = [json.loads(line) for line in (both_ways_run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    valid = [r for r in records if "valid_bleu" in r]
    assert valid and all({"valid_bleu_en-de", "valid_bleu_de-en"} <= set(r) for r in valid)
    results = json.loads((both_ways_run / "results.json").read_text(encoding="utf-8"))
    assert results["best_valid_bleu"] == max(r["valid_bleu"] for r in valid)  # the overall BLEU picks the best
    test = results["test"]
    assert set(test["pairs"]) == {"en-de", "de-en"} and test["sentences"] == 40
    assert all(p["sentences"] == 20 for p in test["pairs"].values())
    card = (both_ways_run / "README.md").read_text(encoding="utf-8")
    assert f"- en-de (`builtin_both_ways[0]`, builtin): test BLEU **{test['pairs']['en-de']['bleu']:.2f}**" in card
    assert "- de-en (`builtin_both_ways[1]`, builtin, read reversed)" in card
    assert "decode.tgt_lang=de" in card and 'tgt_lang="de"' in card


@pytest.mark.slow
def test_decode_cli_names_the_models_languages(both_ways_run: Path, cli, tmp_path: Path) -> None:
    bad = cli("decode", f"checkpoint={both_ways_run}", "sentence=twenty-one", "decode.tgt_lang=fr", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "error: decode.tgt_lang='fr': the model knows de, en"
    )
    good = cli("decode", f"checkpoint={both_ways_run}", "sentence=twenty-one", "decode.tgt_lang=de", cwd=tmp_path)
    assert good.returncode == 0 and good.stdout.strip()


def test_corpora_overrides_parse_back() -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    value = [{"src_lang": "en", "tgt_lang": "de"}, {"preset": "multi30k", "reverse": True}]
    assert OverridesParser.create().parse_override(f"data.corpora={hydra_value(value)}").value() == value


@pytest.mark.slow
def test_card_evaluate_command_scores_each_pair_as_training_did(both_ways_run: Path, cli, tmp_path: Path) -> None:
    card = (both_ways_run / "README.md").read_text(encoding="utf-8")
    command = next(line for line in card.splitlines() if line.startswith("transformer-evaluate "))
    out = tmp_path / "hyp.txt"
    result = cli("evaluate", *shlex.split(command)[1:], "device=cpu", f"output={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    test = json.loads((both_ways_run / "results.json").read_text(encoding="utf-8"))["test"]
    assert {p: s["bleu"] for p, s in scored["pairs"].items()} == {p: s["bleu"] for p, s in test["pairs"].items()}
