"""What a finished run leaves for people: ``curves.png`` and a ``README.md`` run card in the
run directory (sweep.py sums up a multirun).

``transformer-train`` calls ``write_run_report`` once training returns; Python users call it
themselves after ``evaluate.train_and_test(cfg)``, which stays free of plotting.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from transformer.config import DataConfig, DecodeConfig, ModelConfig, config_dir, to_dict
from transformer.data.sources import Mixture, corpus_source, source_for
from transformer.data.tokenizer import Tokenizer
from transformer.errors import UserError
from transformer.model import build_model
from transformer.plots import new_figure
from transformer.rundir import (
    RESUME_CHANGES,
    TEST_SCORES,
    atomic_file,
    atomic_write,
    read_records,
    read_results,
    read_resume_changes,
)
from transformer.train.budget import Plan

log = logging.getLogger(__name__)

# curves -----------------------------------------------------------------------------


def plot_curves(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Training loss and validation NLL (top) and validation BLEU (bottom), against steps
    (left) and wall-clock minutes (right); written to ``<run>/curves.png`` by default."""
    train, valid = read_records(run_dir)
    fig = new_figure(figsize=(10, 6.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex="col", sharey="row")
    for col, (x, label) in enumerate((("step", "step"), ("minutes", "wall-clock minutes"))):
        loss_ax, bleu_ax = axes[0, col], axes[1, col]
        loss_ax.plot([r[x] for r in train], [r["loss"] for r in train], label="train loss (label-smoothed)")
        loss_ax.plot([r[x] for r in valid], [r["valid_nll"] for r in valid], "o--", label="valid NLL")
        bleu_ax.plot([r[x] for r in valid], [r["valid_bleu"] for r in valid], "o-", color="C2", label="valid BLEU")
        if valid:
            best = max(valid, key=lambda r: r["valid_bleu"])
            bleu_ax.plot(
                [best[x]], [best["valid_bleu"]], "*", color="C3", markersize=14, label=f"best {best['valid_bleu']:.2f}"
            )
        bleu_ax.set_xlabel(label)
        for ax in (loss_ax, bleu_ax):
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("nats per target token")
    axes[1, 0].set_ylabel("BLEU")
    axes[0, 0].legend()
    axes[1, 0].legend()
    fig.suptitle(str(run_dir), fontsize="small")
    path = Path(path) if path else Path(run_dir) / "curves.png"
    with atomic_file(path) as f:
        fig.savefig(f, dpi=100, format=path.suffix.lstrip(".") or "png")
    return path


# run card ---------------------------------------------------------------------------


def hydra_value(value: Any) -> str:
    """``value`` as the right-hand side of a Hydra command-line override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):  # data.corpora
        return "[" + ",".join(map(hydra_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and (
        not re.fullmatch(r"[A-Za-z_/.~][\w./:+~-]*", value) or value in ("true", "false", "null")
    ):
        return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def changed_overrides(
    prefix: str, values: dict, group_file: Path, schema: type, keys: tuple[str, ...] | None = None
) -> list[str]:
    """``prefix.key=value`` for every key (of ``keys``) where ``values`` differs from what the
    config group file gives on top of the schema's defaults."""
    preset = [OmegaConf.load(group_file)] if group_file.is_file() else []  # a source registered elsewhere has none here
    base = OmegaConf.merge(OmegaConf.structured(schema), *preset)
    defaults = OmegaConf.to_container(base, resolve=True, throw_on_missing=False)
    return [f"{prefix}.{k}={hydra_value(values[k])}" for k in keys or values if values[k] != defaults[k]]


def shell(tokens: list[str]) -> str:
    return " ".join(shlex.quote(t) for t in tokens)


def use_commands(run_dir: str, cfg: dict, languages: list[str]) -> list[str]:
    """Shell commands that score the run's test split as training did and translate with it
    (a multilingual model into the first of its ``languages``)."""
    configs = Path(config_dir())
    data, source = cfg["data"], corpus_source(data_config(cfg["data"]))
    decode = changed_overrides("decode", cfg["decode"], configs / "decode" / "beam.yaml", DecodeConfig)
    keys = (*source.split_keys, *(k for k in Mixture.split_keys if k in data))  # older runs lack them
    data_opts = changed_overrides("data", data, configs / "data" / f"{source.name}.yaml", DataConfig, keys)
    tgt = [f"decode.tgt_lang={hydra_value(languages[0])}"] if languages and not cfg["decode"].get("tgt_lang") else []
    return [
        shell(["transformer-evaluate", f"checkpoint={run_dir}", f"data={source.name}", *data_opts, *decode]),
        shell(
            [
                "transformer-decode",
                f"checkpoint={run_dir}",
                *decode,
                *tgt,
                "input=source.txt",
                "output=translations.txt",
            ]
        ),
        shell(
            [
                "transformer-decode",
                f"checkpoint={run_dir}",
                *decode,
                *tgt,
                "sentence=a sentence to translate",
                "plot_attention=attention.png",
            ]
        ),
    ]


def corpora_lines(mixture: Mixture, data: dict, test: dict | None) -> list[str]:
    """One line per corpus of a multilingual run: its pair, where it comes from, its test BLEU."""
    tags = ", sources tagged <2xx>" if data["tgt_lang_tag"] else ""
    lines = [
        f"- name `{data['name']}`: {len(mixture.members)} corpora, sampling temperature {data['sampling_temperature']:g}{tags}"
    ]
    pairs = (test or {}).get("pairs", {})
    for c, source in mixture.members:
        scored = f": test BLEU **{pairs[c.pair]['bleu']:.2f}**" if c.pair in pairs else ""
        lines.append(
            f"  - {c.pair} (`{c.cfg.name}`, {source.origin()}{', read reversed' if c.reverse else ''}){scored}"
        )
    return lines


def data_config(data: dict) -> DataConfig:
    """A run's saved data section as the schema (a key this version does not know is left out)."""
    known = {f.name for f in fields(DataConfig)}
    return DataConfig(**{k: v for k, v in data.items() if k in known})


def data_lines(data: dict, test: dict | None) -> list[str]:
    source = source_for(data_config(data))
    if isinstance(source, Mixture):
        return [*corpora_lines(source, data, test), *tokenizer_lines(data, test)]
    lines = [f"- name `{data['name']}`, source `{source.name}`, {data['src_lang']} -> {data['tgt_lang']}"]
    return lines + source.card_lines() + tokenizer_lines(data, test)


def tokenizer_lines(data: dict, test: dict | None) -> list[str]:
    lines = []
    if data["valid_max_sentences"]:
        lines.append(f"- validation BLEU on the first {data['valid_max_sentences']} sentences")
    if test:
        lines.append(f"- test sentences scored: {test['sentences']}")
    vocab = "one joint" if data["joint_vocab"] else "a source and a target"
    lines.append(
        f"- {vocab} SentencePiece BPE model, {data['vocab_size']} pieces requested; pairs longer than {data['max_len']} subwords dropped from training"
    )
    return lines


def model_lines(model: dict, tokenizer: Tokenizer) -> list[str]:
    cfg = ModelConfig(
        **{**model, "src_vocab_size": tokenizer.src_vocab_size, "tgt_vocab_size": tokenizer.tgt_vocab_size}
    )
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        n_params = build_model(cfg).num_parameters()
    tied = ", ".join(
        name
        for name, on in (
            ("shared source/target embeddings", cfg.share_embeddings),
            ("output tied to target embeddings", cfg.tie_output),
        )
        if on
    )
    return [
        f"- {n_params:,} parameters",
        f"- d_model {cfg.d_model}, {cfg.n_heads} heads, {cfg.n_encoder_layers} encoder + {cfg.n_decoder_layers} decoder layers, d_ff {cfg.d_ff}{f' (decoder {cfg.decoder_d_ff})' if cfg.decoder_d_ff else ''}, "
        f"{'pre' if cfg.norm_first else 'post'}-norm ({cfg.norm}), {cfg.positional} positions, {cfg.activation}",
        f"- vocabulary {cfg.src_vocab_size} source / {cfg.tgt_vocab_size} target pieces"
        + (f"; {tied}" if tied else ""),
        f"- dropout {cfg.dropout} (attention {cfg.attention_dropout}, feed-forward {cfg.activation_dropout}), max_positions {cfg.max_positions}",
    ]


def minutes_text(minutes: float) -> str:
    if minutes < 1:
        return f"{minutes * 60:.0f} s"
    return f"{minutes:.1f} min" if minutes < 60 else f"{int(minutes // 60)} h {int(minutes % 60):02d} min"


def use_lines(run_dir: str | Path, cfg: dict, languages: list[str]) -> list[str]:
    """The card's "Use it": shell commands and the Python API (into the first of a multilingual
    model's ``languages``)."""
    lang = f", tgt_lang={json.dumps(languages[0])}" if languages else ""
    out = ["## Use it", ""]
    if not Path(run_dir).is_absolute():
        out += ["From the directory training ran in:", ""]
    return out + [
        "```sh",
        *use_commands(str(run_dir), cfg, languages),
        "```",
        "",
        "```python",
        "from transformer import Translator",
        "",
        f"translator = Translator.from_checkpoint({json.dumps(str(run_dir))})",
        f'print(translator.translate(["a sentence to translate"]{lang}))',
        "```",
    ]


def result_lines(metrics: dict, t: dict, test: dict | None) -> list[str]:
    """The card's Results: validation, steps and time, hardware, the budget's plan, test scores."""
    search = "greedy" if t["eval_beam_size"] <= 1 else f"beam {t['eval_beam_size']}"
    out = [
        f"- best validation BLEU **{metrics['best_valid_bleu']:.2f}** at step {metrics['best_step']} "
        f"(search: {search}, trainer.eval_beam_size)"
    ]
    planned = metrics.get("budget_plan", {}).get("max_steps", t["max_steps"])
    out.append(
        f"- trained {metrics['step']} of {planned} steps in {minutes_text(metrics['minutes'])} of wall time (validation included)"
    )
    if "hardware" in metrics:
        hw = metrics["hardware"]
        out.append(
            f"- on {hw['machine']} class `{hw['cpu_class']}`{', CUDA ' + hw['cuda'] if hw.get('cuda') else ''}, {hw['threads']} threads, "
            f"training precision {metrics.get('precision', t['precision'])}"
        )
    if "budget_plan" in metrics:
        plan = Plan.from_dict(metrics["budget_plan"])
        out.append(
            f"- schedule fitted to trainer.time_budget_minutes={t.get('time_budget_minutes', 0):g}: {plan.line()}"
        )
    if not test:
        return [*out, "- no test scores (evaluate_test=false, or no best checkpoint)"]
    out.append(
        f"- test `{test['data']}` ({test['sentences']} sentences, `{Path(test['checkpoint']).name}`, beam {test['beam_size']}, "
        f"length penalty {test['length_penalty']}): BLEU **{test['bleu']:.2f}**, chrF2 {test['chrf']:.2f}, BLEU lowercased {test['bleu_lc']:.2f}"
    )
    return [*out, f"  - BLEU signature `{test['bleu_signature']}`", f"  - chrF signature `{test['chrf_signature']}`"]


def config_lines(run: Path, cfg: dict) -> list[str]:
    """The card's Configuration: the command-line overrides Hydra saved, else the whole config."""
    overrides_file = run / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        return ["Resolved config:", "", "```yaml", OmegaConf.to_yaml(OmegaConf.create(cfg)).rstrip(), "```", ""]
    overrides = OmegaConf.to_container(OmegaConf.load(overrides_file))
    return [
        "Command-line overrides (`.hydra/overrides.yaml`; the full resolved config is `.hydra/config.yaml`):",
        "",
        "```",
        *(overrides or ["(none)"]),
        "```",
        "",
    ]


def resume_lines(run: Path) -> list[str]:
    """The settings resumes were allowed to change (trainer.resume_allow), step by step."""
    lines = [
        f"- at step {r['step']}: " + ", ".join(f"`{k}` {old} -> {new}" for k, (old, new) in r[RESUME_CHANGES].items())
        for r in read_resume_changes(run)
    ]
    return ["Settings changed on resume (`trainer.resume_allow`):", "", *lines, ""] if lines else []


def run_card(run_dir: str | Path, cfg: dict, metrics: dict, curves: bool = True) -> str:
    """The Markdown text of ``<run>/README.md``."""
    run = Path(run_dir)
    tokenizer = Tokenizer.load(run)
    if tokenizer is None:
        raise UserError(f"{run}: no spm.model (is this a training run directory?)")
    test = metrics.get("test")
    if test is None and (run / TEST_SCORES).is_file():
        test = json.loads((run / TEST_SCORES).read_text(encoding="utf-8"))
    out = [f"# Run `{run.name}`", "", f"`{run}`", ""]
    if curves:
        out += ["![training curves](curves.png)", ""]
    out += ["## Results", "", *result_lines(metrics, cfg["trainer"], test), ""]
    out += ["## Data", "", *data_lines(cfg["data"], test), ""]
    out += ["## Model", "", *model_lines(metrics.get("model", cfg["model"]), tokenizer), ""]  # as trained
    out += ["## Configuration", "", *config_lines(run, cfg), *resume_lines(run)]
    out += use_lines(run_dir, cfg, tokenizer.languages)
    return "\n".join(out) + "\n"


def write_run_report(run_dir: str | Path, cfg: Any = None, metrics: dict | None = None) -> dict[str, Path]:
    """Write ``curves.png`` (skipped, with a warning, without matplotlib) and the ``README.md``
    run card into ``run_dir``. ``cfg`` (a composed config or ``TrainConfig``) defaults to
    ``<run>/.hydra/config.yaml`` and ``metrics`` to ``<run>/results.json``."""
    run = Path(run_dir)
    if cfg is None:
        if not (run / ".hydra" / "config.yaml").is_file():
            raise UserError(f"{run}: no .hydra/config.yaml; pass the config the run was trained with")
        cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    if metrics is None:
        metrics = read_results(run)
    written: dict[str, Path] = {}
    try:
        written["curves"] = plot_curves(run)
    except UserError as e:
        log.warning("no curves.png: %s", e)
    written["card"] = run / "README.md"
    atomic_write(written["card"], run_card(run_dir, to_dict(cfg), metrics, curves="curves" in written))
    log.info("run card: %s", written["card"])
    return written
