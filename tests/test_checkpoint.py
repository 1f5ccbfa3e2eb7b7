"""Checkpoints round-trip exactly, are never left half-written, and a wrong or damaged
file is reported by path instead of crashing somewhere later."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest
import torch

from transformer.checkpoint import FORMAT, atomic_save, load_checkpoint, model_from_checkpoint, resolve_checkpoint
from transformer.data.builtin import builtin_splits
from transformer.data.tokenizer import build_tokenizer
from transformer.errors import UserError
from transformer.vocab import BOS, EOS


@pytest.fixture
def best(tiny_run: Path) -> Path:
    return tiny_run / "checkpoints" / "best.pt"


@torch.no_grad()
def logits_of(model: torch.nn.Module) -> torch.Tensor:
    src = torch.tensor([[5, 6, 7, EOS], [8, 9, EOS, 0]])
    tgt = torch.tensor([[BOS, 10, 11], [BOS, 12, 0]])
    return model.eval()(src, tgt)


def test_round_trip_gives_identical_weights_and_logits(best: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(best)
    assert ckpt["format"] == FORMAT
    model, tokenizer = model_from_checkpoint(ckpt)
    copy = tmp_path / "copy.pt"
    atomic_save({**ckpt, "model": model.state_dict()}, copy)
    again, tokenizer_again = model_from_checkpoint(load_checkpoint(copy))
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(logits_of(model), logits_of(again))
    assert tokenizer_again.to_state() == tokenizer.to_state()
    if model.cfg.tie_output:  # tying survives the round trip
        assert again.output.weight is again.tgt_embed.tokens.weight


def test_checkpoint_holds_everything_decode_needs(best: Path) -> None:
    ckpt = load_checkpoint(best)
    assert {"model", "model_config", "tokenizer"} <= ckpt.keys()
    model, tokenizer = model_from_checkpoint(ckpt)
    assert model.cfg.src_vocab_size == tokenizer.src_vocab_size


def test_configs_are_stored_as_plain_values_and_older_ones_load_typed(best: Path, tmp_path: Path) -> None:
    """Checkpoints hold configs as plain dicts (enums as their strings, so ``weights_only``
    loading reads them); one written before the enums, with fewer keys, loads into the schema."""
    from transformer.config import Activation, ModelConfig, Positional, Precision, TrainConfig, typed

    ckpt = load_checkpoint(best)
    stored = [*ckpt["model_config"].values(), *ckpt["config"]["trainer"].values(), *ckpt["config"]["decode"].values()]
    assert all(type(v) in (str, int, float, bool, list, type(None)) for v in stored)
    older = {k: v for k, v in ckpt["model_config"].items() if k not in ("norm", "decoder_d_ff")}
    old = tmp_path / "old.pt"
    atomic_save({**ckpt, "model_config": {**older, "activation": "gelu", "positional": "sinusoidal_fairseq"}}, old)
    model, _ = model_from_checkpoint(load_checkpoint(old))
    assert model.cfg.activation is Activation.gelu and model.cfg.positional is Positional.sinusoidal_fairseq
    assert model.cfg == ModelConfig(**{**older, "activation": "gelu", "positional": "sinusoidal_fairseq"})
    cfg = typed(ckpt["config"], TrainConfig)  # the run's config as the checkpoint stored it
    assert (
        isinstance(cfg.trainer.precision, Precision) and cfg.trainer.precision == ckpt["config"]["trainer"]["precision"]
    )


def test_resolve_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    assert resolve_checkpoint(str(tiny_run)) == tiny_run / "checkpoints" / "best.pt"
    assert resolve_checkpoint(str(tiny_run), "last.pt") == tiny_run / "checkpoints" / "last.pt"
    with pytest.raises(UserError, match=f"{tmp_path}: run directory holds no checkpoints/best.pt"):
        resolve_checkpoint(str(tmp_path))


def test_atomic_save_leaves_only_the_target(tmp_path: Path) -> None:
    target = tmp_path / "ckpt" / "last.pt"
    atomic_save({"format": FORMAT, "x": torch.arange(3)}, target)
    atomic_save({"format": FORMAT, "x": torch.arange(4)}, target)
    assert [p.name for p in target.parent.iterdir()] == ["last.pt"]
    assert torch.equal(load_checkpoint(target)["x"], torch.arange(4))
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert target.stat().st_mode == plain.stat().st_mode  # not mkstemp's private 0600


def test_failed_write_never_leaves_a_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "last.pt"

    def save_half_then_fail(obj, f) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    full = f"^{re.escape(str(target))}: cannot write \\(No space left on device\\); files written before are kept$"
    with pytest.raises(UserError, match=full):  # one line naming the file, not a traceback
        atomic_save({"format": FORMAT}, target)
    assert list(tmp_path.iterdir()) == []  # no target, no temporary file

    monkeypatch.undo()
    atomic_save({"format": FORMAT, "x": torch.ones(2)}, target)
    before = target.read_bytes()
    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(UserError, match=full):
        atomic_save({"format": FORMAT, "x": torch.zeros(2)}, target)
    assert target.read_bytes() == before  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_truncated_checkpoint_names_the_path(best: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    with pytest.raises(UserError, match=f"{truncated}: not a readable checkpoint"):
        load_checkpoint(truncated)


def test_foreign_files_name_the_path(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(
        UserError, match=f"{text}: not a readable checkpoint: 17 bytes that are not a PyTorch checkpoint archive"
    ):
        load_checkpoint(text)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, other)
    with pytest.raises(UserError, match=f"{other}: not a checkpoint written by this package"):
        load_checkpoint(other)
    with pytest.raises(UserError, match=f"{tmp_path / 'missing.pt'}: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_tokenizer_of_another_vocabulary_is_refused(best: Path) -> None:
    ckpt = load_checkpoint(best)
    pairs = builtin_splits(200, 1, 1, 99)["train"]
    other_size = build_tokenizer(pairs, vocab_size=150, joint=True, max_sentences=1000)
    with pytest.raises(UserError, match="tokenizer vocabulary .* does not match the checkpoint"):
        model_from_checkpoint(ckpt, other_size)
    _, own = model_from_checkpoint(ckpt)
    reversed_pairs = [(t, s) for s, t in builtin_splits(200, 1, 1, 5)["train"]]
    same_size = build_tokenizer(reversed_pairs, vocab_size=own.src_vocab_size, joint=True, max_sentences=1000)
    assert same_size.src_vocab_size == own.src_vocab_size
    with pytest.raises(UserError, match="tokenizer differs"):
        model_from_checkpoint(ckpt, same_size)
    model_from_checkpoint(ckpt, own)  # the run's own tokenizer is accepted
