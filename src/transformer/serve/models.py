"""The checkpoints a server translates with, by name, and what GET /models says of them.

Where a model decodes in a worker process (``serve.decode_process``), the server's own
process reads only what it needs to check and tokenize requests and to describe the model
(config, tokenizer, the model's shape on the meta device): each model's weights are loaded
once, in its worker."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

from transformer.checkpoint import load_model
from transformer.config import DecodeConfig
from transformer.decode.spec import check_decode_config
from transformer.decode.translator import Translation, Translator
from transformer.errors import UserError
from transformer.runtime import resolve_device
from transformer.serve.batcher import Worker
from transformer.serve.settings import ServeRunConfig

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """A translator under a name, with its description for GET /models."""

    name: str
    translator: Translator  # tokenizes requests; decodes them too unless ``decoder`` is set
    info: dict[str, Any]
    decoder: Worker | None = None  # a supervised decoding process, e.g. a worker.ProcessDecoder

    def decode(self, sentences: list[str], options: DecodeConfig, attention: bool) -> list[list[Translation]]:
        """n-best lists of one batch (run by the model's batcher thread)."""
        if self.decoder is not None:
            return self.decoder(sentences, options, attention)
        return self.translator.hypotheses(sentences, attention=attention, **asdict(options))


def describe(name: str, path: str, config: dict, translator: Translator) -> dict[str, Any]:
    """Name, languages, vocabulary, size and decode defaults of a loaded checkpoint (``config``: its training config)."""
    data = config.get("data", {})
    model = translator.models[0]
    tok = translator.tokenizer
    return {
        "name": name,
        "checkpoint": path,
        "source_language": data.get("src_lang"),
        "target_language": data.get("tgt_lang"),
        "target_languages": tok.languages,  # a tagged model's: pick one with the request's tgt_lang
        "source_vocab_size": tok.src_vocab_size,
        "target_vocab_size": tok.tgt_vocab_size,
        "joint_vocab": tok.joint,
        "parameters": model.num_parameters(),
        "architecture": {
            k: getattr(model.cfg, k)
            for k in ("d_model", "n_heads", "n_encoder_layers", "n_decoder_layers", "d_ff", "max_positions")
        },
        "decode_defaults": asdict(translator.config),
    }


def decodes_in_worker(cfg: ServeRunConfig) -> bool:
    """Whether each model decodes in a worker process (CTranslate2 releases the GIL itself)."""
    return cfg.serve.decode_process and cfg.serve.engine == "torch"


def load_translator(
    path: str, device: str, decode: DecodeConfig, engine: str = "torch", weights: bool = True
) -> tuple[Translator, dict]:
    """A checkpoint's translator (and its training config), used once so packed weights exist
    before the first request (``engine=ctranslate2``: one that searches with CTranslate2). The
    server's decode.tgt_lang is the default of tagged models only: an untagged one on the same
    server ignores it. ``weights=False``: a translator that tokenizes and describes but cannot
    search (its model is on the meta device; a worker process decodes)."""
    model, tokenizer, config = load_model(path, weights=weights)
    if not tokenizer.tags:
        decode = replace(decode, tgt_lang=None)
    elif decode.tgt_lang is not None and decode.tgt_lang not in tokenizer.tags:
        raise UserError(
            f"{path}: decode.tgt_lang={decode.tgt_lang!r}: the model knows {', '.join(tokenizer.languages)}"
        )
    if not weights:
        return Translator([model], tokenizer, decode, checkpoint=path), config
    if engine == "ctranslate2":
        from transformer.serve.ct2_engine import CT2Translator

        translator: Translator = CT2Translator(path, decode, model=model, tokenizer=tokenizer)
    else:
        translator = Translator([model.to(resolve_device(device))], tokenizer, decode, checkpoint=path)
    translator.translate("warm up", tgt_lang=decode.tgt_lang or (tokenizer.languages or [None])[0])
    return translator, config


def load_served_model(
    name: str, path: str, device: str, decode: DecodeConfig, engine: str = "torch", weights: bool = True
) -> ServedModel:
    """The model under ``name`` (empty: its languages, e.g. en-de); ``weights=False`` for one
    whose ``decoder`` (a worker process) will hold the weights."""
    translator, config = load_translator(path, device, decode, engine, weights)
    if not name:
        data = config.get("data", {})
        name = f"{data['src_lang']}-{data['tgt_lang']}" if data.get("src_lang") and data.get("tgt_lang") else "default"
    log.info("model %s: %s (%s parameters)", name, path, f"{translator.models[0].num_parameters():,}")
    return ServedModel(name, translator, describe(name, path, config, translator))


def load_models(cfg: ServeRunConfig, weights: bool = True) -> list[ServedModel]:
    """``checkpoint=`` (one model, named after its languages) or ``models={name: path}``;
    ``weights=False`` where workers decode (``decodes_in_worker``)."""
    if bool(cfg.checkpoint) == bool(cfg.models):
        raise UserError("give checkpoint=RUN_DIR_OR_PT or models={name: RUN, ...} (exactly one of them)")
    try:
        check_decode_config(cfg.decode)
    except UserError as e:
        raise UserError(f"{e} (the server's decode defaults)") from None
    if cfg.checkpoint:
        return [load_served_model("", cfg.checkpoint, cfg.device, cfg.decode, cfg.serve.engine, weights)]
    for name in cfg.models:
        if not name.strip() or "/" in name:
            raise UserError(f"models: {name!r} is not a usable model name (non-empty, no '/')")
    return [
        load_served_model(name, str(path), cfg.device, cfg.decode, cfg.serve.engine, weights)
        for name, path in cfg.models.items()
    ]
