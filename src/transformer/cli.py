"""Console entry points: thin Hydra wrappers around ``train``, ``evaluate`` and ``Translator``.

Mistakes a user can fix (``UserError``) print one line, ``error: ...``, and exit with 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from transformer.commands import print_version, quiet_logging, run_plain_command
from transformer.config import DecodeConfig, config_dir, register_configs
from transformer.errors import UserError
from transformer.runtime import use_fast_allocator


def hydra_entry(config_name: str, task: Callable[[DictConfig], Any]) -> None:
    """Run ``task`` under Hydra with the packaged configs, turning UserErrors into one line."""
    if print_version(sys.argv[1:]):
        return
    register_configs()

    def guarded(cfg: DictConfig) -> Any:
        try:
            if missing := sorted(OmegaConf.missing_keys(cfg)):  # e.g. transformer-decode without checkpoint=
                raise UserError(f"{', '.join(missing)} must be given ({missing[0]}=...; see --help)")
            return task(cfg)
        except UserError as e:
            logging.getLogger("transformer").debug("user error", exc_info=True)
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(guarded)()


def decode_config(cfg: DictConfig) -> DecodeConfig:
    return DecodeConfig(**OmegaConf.to_container(cfg.decode, resolve=True))


# train ------------------------------------------------------------------------------


def _train(cfg: DictConfig) -> float:
    from transformer.evaluate import train_and_test as train

    if not cfg.run_dir:  # resolved once: a new config holding Hydra's output directory
        cfg = OmegaConf.merge(cfg, {"run_dir": HydraConfig.get().runtime.output_dir})
    if cfg.data.monolingual_tgt:  # back-translation first (docs/distillation.md)
        from transformer.config import TrainConfig, typed
        from transformer.distill import back_translated

        cfg = back_translated(typed(cfg, TrainConfig))
    metrics = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # torchrun: one summary and report, from the process that wrote the run
        from transformer.report import write_run_report

        print(
            json.dumps(
                {k: v for k, v in metrics.items() if k != "test"}
                | {"test": {k: v for k, v in metrics.get("test", {}).items() if not k.endswith("detail")}},
                indent=2,
            )
        )
        write_run_report(metrics["run_dir"], cfg, metrics)
    return metrics["best_valid_bleu"]


def train_cli() -> None:
    hydra_entry("train", _train)


def train_main() -> None:
    """The transformer-train command: train_cli in a process running under mimalloc. Only a
    command's own process re-executes itself; train_cli called from Python never does."""
    use_fast_allocator()
    train_cli()


# distill ----------------------------------------------------------------------------


def _distill(cfg: DictConfig) -> float:
    from transformer.distill import distill

    if not cfg.run_dir:  # resolved once: a new config holding Hydra's output directory
        cfg = OmegaConf.merge(cfg, {"run_dir": HydraConfig.get().runtime.output_dir})
    metrics = distill(cfg)
    print(json.dumps(metrics.get("distill", {}), indent=2))
    return metrics["best_valid_bleu"]


def distill_main() -> None:
    """The transformer-distill command, under mimalloc (see train_main)."""
    use_fast_allocator()
    hydra_entry("distill", _distill)


# evaluate ---------------------------------------------------------------------------


def _evaluate(cfg: DictConfig) -> dict:
    quiet_logging()
    from transformer.evaluate import evaluate

    data = OmegaConf.to_object(cfg.data) if cfg.src_file is None else None
    result = evaluate(
        cfg.checkpoint,
        data=data,
        split=cfg.split,
        src_file=cfg.src_file,
        ref_file=cfg.ref_file,
        decode=decode_config(cfg),
        output=cfg.output,
        device=cfg.device,
        ensemble=list(cfg.ensemble),
    )
    print(result["bleu_detail"])
    print(f"chrF2 = {result['chrf']:.2f}  ({result['chrf_signature']})")
    print(f"BLEU (lowercased) = {result['bleu_lc']:.2f}")
    print(f"hypotheses: {result['hypotheses_file']}")
    return result


def evaluate_cli() -> None:
    hydra_entry("evaluate", _evaluate)


# decode -----------------------------------------------------------------------------


def _decode(cfg: DictConfig) -> None:
    quiet_logging()
    from transformer.data.corpus import open_text
    from transformer.decode.alignment import pharaoh
    from transformer.decode.translator import Translator

    translator = Translator.from_checkpoint(
        cfg.checkpoint, device=cfg.device, ensemble=cfg.ensemble, config=decode_config(cfg)
    )
    if cfg.sentence is not None:
        lines: Any = [cfg.sentence]
    elif cfg.input:
        lines = (line for _, line in open_text(cfg.input))
    else:
        lines = sys.stdin
    # a terminal gets each line back at once, a pipe every 64 lines; a file is read in chunks
    # big enough to fill decode.batch_tokens (1,024 lines: 1.05-1.1x faster beam 5 than 64)
    chunk = (1 if sys.stdin.isatty() else 64) if lines is sys.stdin else 1024
    first: list[str] = []  # the first input line, for plot_attention

    def remember_first(stream: Any) -> Any:
        for line in stream:
            if not first:
                first.append(line.rstrip("\r\n"))
            yield line

    if cfg.plot_attention:
        from transformer.plots import attention_picture, require_matplotlib

        require_matplotlib()  # fail before translating, not after
    out = open(cfg.output, "w", encoding="utf-8") if cfg.output else sys.stdout
    try:
        for i, hyps in enumerate(translator.translate_stream(remember_first(lines), chunk=chunk)):
            if i == 0 and cfg.plot_attention:
                attention_picture(translator, first[0], cfg.plot_attention, cfg.attention_layer, cfg.attention_head)
                logging.getLogger(__name__).info("cross-attention of line 1 written to %s", cfg.plot_attention)
            texts = [h.text if h.alignment is None else f"{h.text} ||| {pharaoh(h.alignment)}" for h in hyps]
            if translator.config.n_best > 1:
                # n-best format (as fairseq/Moses): line index ||| translation ||| score
                for h, text in zip(hyps, texts):
                    out.write(f"{i} ||| {text} ||| {h.score:.4f}\n")
            elif cfg.scores:
                out.write(f"{hyps[0].score:.4f}\t{texts[0]}\n")
            else:
                out.write(texts[0] + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()


def decode_cli() -> None:
    hydra_entry("decode", _decode)


# serve ------------------------------------------------------------------------------


def serve_main() -> None:
    """The transformer-serve command: serve_cli under mimalloc (see train_main)."""
    use_fast_allocator()
    serve_cli()


def serve_cli() -> None:
    from transformer.serve.server import serve
    from transformer.serve.settings import USAGE, ServeRunConfig

    run_plain_command(ServeRunConfig, sys.argv[1:], USAGE, serve)
