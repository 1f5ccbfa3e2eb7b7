"""Every YAML file composes against the typed schemas, so a config that ships broken or a
misspelt key on the command line fails at compose time, naming the key."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from transformer.config import (
    DataConfig,
    DecodeConfig,
    DecodeRunConfig,
    DistillConfig,
    EvaluateConfig,
    ModelConfig,
    TrainConfig,
    TrainerConfig,
    config_dir,
    missing_keys,
)
from transformer.errors import UserError

CONFIGS = Path(config_dir())
GROUPS = ("model", "data", "trainer", "decode", "experiment")


def group_options() -> list[tuple[str, str]]:
    return [(group, p.stem) for group in GROUPS for p in sorted((CONFIGS / group).glob("*.yaml"))]


def test_config_dir_holds_the_three_entry_configs() -> None:
    assert {p.name for p in CONFIGS.glob("*.yaml")} >= {"train.yaml", "evaluate.yaml", "decode.yaml"}
    assert {g for g, _ in group_options()} == set(GROUPS)


@pytest.mark.parametrize("group, name", group_options())
def test_every_group_option_composes_into_train(compose_cfg, group: str, name: str) -> None:
    cfg = compose_cfg("train", [f"{group}={name}"])
    for key in missing_keys(cfg):  # ??? marks a name the user must give (data/hub: hub_name)
        OmegaConf.update(cfg, key, "given-by-the-user")
    typed = OmegaConf.to_object(cfg)  # every value has its schema's type
    assert isinstance(typed, TrainConfig)
    if group != "experiment":  # the file's own values arrive (interpolations and ??? aside)
        composed = OmegaConf.to_container(cfg[group], resolve=True)
        for key, value in OmegaConf.to_container(OmegaConf.load(CONFIGS / group / f"{name}.yaml")).items():
            if not (isinstance(value, str) and ("${" in value or value == "???")):
                assert composed[key] == value, f"{group}/{name}.yaml: {key}"


def schema_hints(schema: type) -> dict[str, object]:
    """Every field's type in ``schema`` and the dataclasses it holds, by dotted key."""
    hints = {}
    for name, hint in typing.get_type_hints(schema).items():
        hints[f"{schema.__name__}.{name}"] = hint
        for inner in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(inner):
                hints |= schema_hints(inner)
    return hints


@pytest.mark.parametrize("schema", [TrainConfig, DistillConfig, EvaluateConfig, DecodeRunConfig])
def test_the_schema_types_every_key(schema: type) -> None:
    hints = schema_hints(schema)
    assert "DataConfig.corpora" in hints and "CorpusEntry.reverse" in hints or schema is DecodeRunConfig
    assert [key for key, hint in hints.items() if typing.Any in (hint, *typing.get_args(hint))] == []


def test_tiny_experiment_is_tiny(tiny_cfg) -> None:
    assert tiny_cfg.model.d_model <= 64 and tiny_cfg.data.builtin_train <= 1000
    assert tiny_cfg.trainer.max_steps <= 100
    assert tiny_cfg.run_dir and not Path(tiny_cfg.run_dir).exists()


@pytest.mark.parametrize("name, schema", [("evaluate", EvaluateConfig), ("decode", DecodeRunConfig)])
def test_evaluate_and_decode_configs_compose(compose_cfg, name: str, schema: type) -> None:
    cfg = compose_cfg(name, ["checkpoint=x", "decode=greedy"])
    typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, schema)
    assert typed.checkpoint == "x" and typed.decode.beam_size == 1


def test_checkpoint_is_required(compose_cfg) -> None:
    cfg = compose_cfg("decode")
    with pytest.raises(Exception, match="checkpoint"):
        OmegaConf.to_object(cfg)


@pytest.mark.parametrize(
    "config_name, override, key",
    [
        ("train", "model.d_modle=3", "d_modle"),
        ("train", "trainer.learning_rate=1", "learning_rate"),
        ("decode", "decode.beam=4", "beam"),
        ("evaluate", "splt=valid", "splt"),
    ],
)
def test_misspelt_key_fails_at_compose_naming_the_key(compose_cfg, config_name: str, override: str, key: str) -> None:
    with pytest.raises(ConfigCompositionException, match=f"override '[a-z.]*{key}'"):
        compose_cfg(config_name, ["checkpoint=x", override] if config_name != "train" else [override])


def test_wrong_type_fails_at_compose(compose_cfg) -> None:
    with pytest.raises(ConfigCompositionException, match="trainer.max_steps=many") as err:
        compose_cfg("train", ["trainer.max_steps=many"])
    assert "Integer" in str(err.value.__cause__)


def enumerated_keys() -> list[tuple[str, str, type]]:
    from transformer.config import SECTIONS, enum_fields

    return [(section, key, kind) for section, schema in SECTIONS.items() for key, kind in enum_fields(schema).items()]


def test_every_enumerated_key_is_checked_at_start(compose_cfg, tmp_path) -> None:
    """A misspelt value of any enumerated key fails before data loads, naming the key and the
    values it takes: at compose time (an Enum field), or as the run starts (a switch)."""
    from transformer.train.loop import train

    assert len(enumerated_keys()) == 13  # data.source aside: checked where sources are named
    for section, key, kind in enumerated_keys():
        overrides = ["experiment=tiny", f"run_dir={tmp_path / section / key}", f"{section}.{key}=bogus"]
        try:
            cfg = compose_cfg("train", overrides)
        except ConfigCompositionException as e:
            message = f"{e}: {e.__cause__}"
            assert f"full_key: {section}.{key}" in message and f"expected one of [{', '.join(kind)}]" in message
        else:
            with pytest.raises(UserError, match=rf"{section}.{key}='bogus': expected one of {', '.join(kind)}$"):
                train(cfg)
        assert not (tmp_path / section / key / "spm.model").exists()  # failed before BPE
    cfg = compose_cfg("train", ["experiment=tiny", f"run_dir={tmp_path / 'source'}", "data.source=bogus"])
    with pytest.raises(UserError, match=r"data.source='bogus': expected one of builtin, files, hub\b"):
        train(cfg)
    assert not (tmp_path / "source" / "spm.model").exists()


def test_enumerated_keys_are_checked_when_a_config_is_built_in_python() -> None:
    """The dataclasses check their enumerated fields themselves (the Python API, ``replace``),
    take the YAML's strings (as stored in older checkpoints) and switches given as bools."""
    from dataclasses import replace

    from transformer.config import Precision, Switch

    for section, key, kind in enumerated_keys():
        schema = {"model": ModelConfig, "data": DataConfig, "trainer": TrainerConfig, "decode": DecodeConfig}[section]
        with pytest.raises(UserError, match=rf"^{section}.{key}='bogus': expected one of {', '.join(kind)}$"):
            schema(**{key: "bogus"})
        member = list(kind)[-1]
        built = schema(**{key: str(member)})
        assert getattr(built, key) is member and type(getattr(built, key)) is kind
    decode = replace(DecodeConfig(), precision="fp32", prepack=False)
    assert decode.precision is Precision.fp32 and decode.prepack is Switch.false
    with pytest.raises(UserError, match="decode.precision='fp64'"):
        replace(decode, precision="fp64")


SCHEMAS = {"model": ModelConfig, "data": DataConfig, "trainer": TrainerConfig, "decode": DecodeConfig}
# a data preset names its corpus in full: data.corpora entries read a preset on its own (preset: multi30k)
IDENTITY = {"data": {"name", "source", "src_lang", "tgt_lang"}}


@pytest.mark.parametrize("group, name", [(g, n) for g, n in group_options() if g in SCHEMAS])
def test_group_options_state_only_what_differs_from_the_schema(group: str, name: str) -> None:
    """One default per key: the dataclass holds it, a group option only its own changes, so no
    value is stated twice (where two copies once drifted apart: trainer.max_steps 10000 vs 100000)."""
    defaults = OmegaConf.to_container(OmegaConf.structured(SCHEMAS[group]))
    stated = OmegaConf.to_container(OmegaConf.load(CONFIGS / group / f"{name}.yaml")) or {}
    repeated = [k for k, v in stated.items() if k not in IDENTITY.get(group, ()) and defaults[k] == v]
    assert not repeated, f"{group}/{name}.yaml restates the schema's defaults of {repeated}"


@pytest.mark.parametrize("group, name", [("model", "base"), ("trainer", "default"), ("decode", "beam")])
def test_the_schema_defaults_options_state_nothing(group: str, name: str) -> None:
    """The options that stand for the schema's defaults hold no value of their own."""
    assert not OmegaConf.load(CONFIGS / group / f"{name}.yaml")
