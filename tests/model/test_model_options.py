"""Model options (model.norm, gated activations, model.positional=rope) and trainer.ema_decay:
each keeps what the default model guarantees (cached decoding equals the full forward, a
beam of one is greedy, training resumes exactly, HF export refuses what it cannot express),
and each computes its formula."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tiny import VOCAB, padded, random_sources, tiny_model, tiny_tokenizer
from training import losses, tiny
from transformer.checkpoint import FORMAT, load_checkpoint, model_from_checkpoint
from transformer.config import DecodeConfig, ModelConfig
from transformer.decode.batching import translate_ids
from transformer.decode.scorer import ModelScorer
from transformer.decode.search import beam_search, greedy_search
from transformer.errors import UserError
from transformer.model.attention import rotary_table, rotate
from transformer.model.transformer import FeedForward, RMSNorm
from transformer.train import loop
from transformer.train.ema import EMA, averaged
from transformer.vocab import BOS, EOS

OPTIONS = {
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(activation="swiglu"),
    "geglu": dict(activation="geglu"),
    "rope": dict(positional="rope"),
    "all": dict(norm="rmsnorm", activation="swiglu", positional="rope"),
}
FP32 = ["trainer.precision=fp32", "trainer.onednn_linear=false"]  # exact, and one kernel in every run
TRAIN_OPTIONS = {
    "rmsnorm": ["model.norm=rmsnorm", "model.norm_first=true"],
    "swiglu": ["model.activation=swiglu"],
    "rope": ["model.positional=rope"],
    "ema": ["trainer.ema_decay=0.9"],
}


@torch.no_grad()
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_cached_steps_equal_uncached_and_full_forward(option: str, norm_first: bool) -> None:
    model = tiny_model(norm_first, **OPTIONS[option])
    src = padded(random_sources([7, 4, 9]))
    prefix = torch.cat([torch.full((3, 1), BOS), torch.randint(EOS + 1, VOCAB, (3, 8))], dim=1)
    full = F.log_softmax(model(src, prefix), dim=-1)  # (B, T, V)
    cached, uncached = ModelScorer(model, cached=True), ModelScorer(model, cached=False)
    c_state, u_state = cached.start(src), uncached.start(src)
    order = torch.arange(3)
    for t in range(1, prefix.size(1) + 1):
        if t == 4:  # beams reordered mid-way
            order = torch.tensor([2, 0, 1])
            c_state, u_state = cached.select(c_state, order), uncached.select(u_state, order)
        c_lp, c_state = cached.step(c_state, prefix[order, :t])
        u_lp, u_state = uncached.step(u_state, prefix[order, :t])
        torch.testing.assert_close(c_lp, u_lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(c_lp, full[order, t - 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_beam_of_one_is_greedy(option: str) -> None:
    model = tiny_model(**OPTIONS[option])
    sources = random_sources([5, 9, 3, 12, 7])
    via_translate = translate_ids([model], sources, DecodeConfig(beam_size=1, precision="fp32"))
    with torch.inference_mode():
        beam = beam_search(ModelScorer(model), padded(sources), beam_size=1, early_stop="fairseq", max_len_limit=63)
        greedy = greedy_search(ModelScorer(model), padded(sources), max_len_limit=63)
    assert [h[0].tokens for h in beam] == [h[0].tokens for h in greedy] == [h[0].tokens for h in via_translate]


def test_defaults_build_todays_model_and_old_checkpoints_load() -> None:
    """New keys default to today's model: same parameters; a config saved before them loads."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(vocab=tokenizer.src_vocab_size)
    names = set(model.state_dict())
    assert not any(".gate." in n for n in names) and "decoder.0.ffn_sub.norm.bias" in names
    old = {k: v for k, v in asdict(model.cfg).items() if k != "norm"}
    ckpt = {"model": model.state_dict(), "model_config": old, "tokenizer": tokenizer.to_state()}
    loaded, _ = model_from_checkpoint(ckpt)
    assert loaded.cfg.norm == "layernorm" and isinstance(loaded.decoder[0].ffn_sub.norm, nn.LayerNorm)


def test_rmsnorm_is_the_formula() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x = torch.randn(3, 5, 8)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert norm.eps == nn.LayerNorm(8).eps
    assert norm(x.bfloat16()).dtype == torch.bfloat16
    model = tiny_model(True, norm="rmsnorm")
    norms = [m for m in model.modules() if isinstance(m, (RMSNorm, nn.LayerNorm))]
    assert len(norms) == 2 * 2 + 2 * 3 + 2 and all(isinstance(m, RMSNorm) for m in norms)  # blocks + final norms


@pytest.mark.parametrize("activation, gate", [("swiglu", F.silu), ("geglu", F.gelu)])
def test_gated_feed_forward_is_the_formula(activation: str, gate) -> None:
    torch.manual_seed(0)
    ffn = FeedForward(ModelConfig(d_model=8, d_ff=12, activation=activation), 12)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(ffn(x), ffn.fc2(gate(ffn.fc1(x)) * ffn.gate(x)))
    assert ffn.gate.weight.shape == ffn.fc1.weight.shape == (12, 8)  # d_ff kept as given


def test_rope_scores_depend_only_on_the_offset() -> None:
    torch.manual_seed(0)
    table = rotary_table(40, 8)
    q, k = torch.randn(8), torch.randn(8)
    at = lambda v: rotate(v.expand(1, 1, 40, 8), table)[0, 0]  # noqa: E731  (40, 8): v at every position
    scores = at(q) @ at(k).T  # (m, n) -> q_m . k_n
    for offset in (-7, 0, 3, 12):
        diagonal = torch.diagonal(scores, offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-5, rtol=0)
    torch.testing.assert_close(at(q).norm(dim=-1), q.norm().expand(40))  # rotations keep lengths
    torch.testing.assert_close(at(q)[0], q)  # position 0 is unturned
    with pytest.raises(UserError, match="even head width"):
        rotary_table(4, 5)


@torch.no_grad()
def test_rope_step_at_position_p_equals_the_full_forward() -> None:
    """No position is added to the embeddings, the rotation follows the cache's counter, and
    model.max_positions still limits lengths."""
    model = tiny_model(positional="rope")
    assert model.src_embed.table is None and model.src_embed.positions is None
    src = padded(random_sources([6, 9]))
    prefix = torch.cat([torch.full((2, 1), BOS), torch.randint(EOS + 1, VOCAB, (2, 11))], dim=1)
    memory, mask = model.encode(src)
    full = model.decode(prefix, memory, mask)
    cache = model.start_cache(memory, mask)
    model.decode_step(prefix[:, :7], cache)  # positions 0..6 at once
    for p in range(7, prefix.size(1)):
        torch.testing.assert_close(model.decode_step(prefix[:, p : p + 1], cache), full[:, p], atol=1e-5, rtol=0)
    shifted = model.start_cache(memory, mask)
    model.decode_step(prefix[:, :1], shifted)
    assert not torch.allclose(model.decode_step(prefix[:, 2:3], shifted), full[:, 2], atol=1e-3)  # order matters
    cache.pos = model.cfg.max_positions
    with pytest.raises(UserError, match="max_positions"):
        model.decode_step(prefix[:, :1], cache)


def test_ema_after_k_steps_is_the_hand_computed_average() -> None:
    model = nn.Linear(3, 2)
    ema = EMA(model, 0.8)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.full_like(p, step + 1.0))  # an "optimizer step"
        ema.update()
        expected = {k: 0.8 * expected[k] + 0.2 * v for k, v in model.state_dict().items()}
    averages = ema.state_dict(model)
    assert all(torch.allclose(averages[k], expected[k], atol=1e-6) for k in expected)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with averaged(model, ema):
        assert all(torch.equal(model.state_dict()[k], averages[k]) for k in own)
    assert all(torch.equal(model.state_dict()[k], own[k]) for k in own)


def test_export_refuses_each_option(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Hugging Face and CTranslate2 export alike: one line naming the key, nothing written."""
    pytest.importorskip("transformers")
    from transformer.cli.export import main

    tokenizer = tiny_tokenizer()
    for key, value in [("norm", "rmsnorm"), ("activation", "swiglu"), ("activation", "geglu"), ("positional", "rope")]:
        model = tiny_model(vocab=tokenizer.src_vocab_size, **{key: value})
        checkpoint = tmp_path / f"{value}.pt"
        state = {"model": model.state_dict(), "model_config": asdict(model.cfg), "tokenizer": tokenizer.to_state()}
        torch.save({"format": FORMAT, **state}, checkpoint)
        with pytest.raises(SystemExit) as exit_info:
            main([f"checkpoint={checkpoint}", f"output={tmp_path / value}", f"ct2={tmp_path / 'ct2'}"])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1
        assert f"model.{key}={value} cannot be exported" in err
        assert not (tmp_path / value).exists() and not (tmp_path / "ct2").exists()


def checkpoint_weights(run_dir: Path, name: str, key: str = "model") -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / name)[key]


@pytest.mark.parametrize(  # every option at once in make test; each on its own in make test-all
    "option", ["all", *(pytest.param(option, marks=pytest.mark.slow) for option in TRAIN_OPTIONS)]
)
def test_interrupted_training_resumes_exactly(tmp_path: Path, option: str) -> None:
    options = sum(TRAIN_OPTIONS.values(), []) if option == "all" else TRAIN_OPTIONS[option]
    common = [*options, *FP32, "model.dropout=0.1", "trainer.log_every=1"]
    common += ["trainer.eval_every=1000", "trainer.schedule=constant"]
    full, split = tmp_path / "full", tmp_path / "split"
    loop.train(tiny(full, *common, "trainer.max_steps=12"))
    loop.train(tiny(split, *common, "trainer.max_steps=5"))
    loop.train(tiny(split, *common, "trainer.max_steps=12", f"trainer.resume={split}"))
    assert losses(split) == losses(full)
    a, b = load_checkpoint(full / "checkpoints/last.pt"), load_checkpoint(split / "checkpoints/last.pt")
    ema = option in ("ema", "all")
    for key in ("model", "train_model") if ema else ("model",):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert ("train_model" in a) == ema
    for key, value in (o.removeprefix("model.").split("=") for o in common if o.startswith("model.")):
        assert str(a["model_config"][key]).lower() == value  # the option reached the model


@pytest.mark.slow
def test_ema_checkpoints_validation_and_old_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints: "model" the averages (step by step the recursion), "train_model" the
    trained weights; validation sees the averages and leaves training as it was; a run
    saved without an EMA resumes with one started from its weights."""
    common = [*FP32, "trainer.schedule=constant", "trainer.save_every=1", "trainer.keep_last=10"]
    seen = []

    def spy(model, *args):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return validate(model, *args)

    validate = loop.validate
    monkeypatch.setattr(loop, "validate", spy)
    run, quiet = tmp_path / "ema", tmp_path / "quiet"
    loop.train(tiny(run, *common, "trainer.ema_decay=0.5", "trainer.max_steps=4", "trainer.eval_every=2"))
    loop.train(tiny(quiet, *common, "trainer.ema_decay=0.5", "trainer.max_steps=4", "trainer.eval_every=1000"))
    assert losses(run) == losses(quiet)  # validating on the averages does not disturb training
    for step in (2, 3, 4):
        previous = checkpoint_weights(run, f"step_{step - 1:08d}.pt")
        trained = checkpoint_weights(run, f"step_{step:08d}.pt", "train_model")
        averages = checkpoint_weights(run, f"step_{step:08d}.pt")
        for k, v in averages.items():
            torch.testing.assert_close(v, 0.5 * previous[k] + 0.5 * trained[k], atol=1e-6, rtol=0)
    assert any(not torch.equal(averages[k], trained[k]) for k in averages)
    for validated, step in zip(seen[:2], (2, 4)):
        averages = checkpoint_weights(run, f"step_{step:08d}.pt")
        assert all(torch.equal(validated[k], averages[k]) for k in averages)
    old = tmp_path / "old"
    loop.train(tiny(old, *common, "trainer.max_steps=2"))
    assert "train_model" not in load_checkpoint(old / "checkpoints/last.pt")
    allow = "trainer.resume_allow=[trainer.ema_decay]"  # starting an EMA on resume is a change of settings
    loop.train(tiny(old, *common, "trainer.ema_decay=0.5", "trainer.max_steps=3", f"trainer.resume={old}", allow))
    before, after = checkpoint_weights(old, "step_00000002.pt"), load_checkpoint(old / "checkpoints/step_00000003.pt")
    for k, v in after["model"].items():
        torch.testing.assert_close(v, 0.5 * before[k] + 0.5 * after["train_model"][k], atol=1e-6, rtol=0)


def test_ema_decay_out_of_range_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"trainer.ema_decay=1.0 must be in \[0, 1\)"):
        loop.train(tiny(tmp_path, "trainer.ema_decay=1.0"))
