"""Import a Hugging Face Marian (OPUS-MT) or M2M100 model directory as our checkpoint.

The export mapping run backwards (``export.weight_names`` / ``embedding_names``: one name
table for both directions), plus what such models need and our own do not: their special
ids (OPUS-MT: pad = decoder start = the last id, EOS 0), a vocabulary that is not the
SentencePiece ids (``MappedTokenizer``), swish (``silu``), a final logits bias, and M2M100's
language tokens. Anything the directory asks for that we cannot compute exactly is refused
with one line naming the config field, file or tensor. Nothing is downloaded.

    transformer-import hf=opus-mt-en-de output=opus-en-de.pt
    transformer-import hf=m2m100_418M output=m2m-en-de.pt src_lang=en tgt_lang=de
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING
from torch import Tensor

from transformer.checkpoint import FORMAT, atomic_save
from transformer.config import ModelConfig, to_dict
from transformer.data.tokenizer import MappedTokenizer, Tokenizer
from transformer.errors import UserError, first_line
from transformer.hf_layout import M2M100, MARIAN, embedding_names, weight_names
from transformer.model import build_model
from transformer.model.transformer import ACTIVATIONS, sinusoid_table

ACTIVATION_NAMES = {"swish": "silu"}  # transformers' names that are ours under another name
# Config fields whose non-default value changes what the model computes in a way we do not.
# transformers' defaults for fields a saved config.json may leave out.
DEFAULTS = {
    MARIAN: {"scale_embedding": False, "activation_function": "gelu"},
    M2M100: {"scale_embedding": True, "activation_function": "relu"},
}
REFUSED = {
    "add_bias_logits": False,
    "normalize_embedding": False,
    "add_final_layer_norm": False,
    "layernorm_embedding": False,
    "static_position_embeddings": True,
}


def read_directory(directory: Path) -> tuple[dict, dict[str, Tensor]]:
    """config.json and the weights (model.safetensors, else pytorch_model.bin read safely)."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path}: not valid JSON ({first_line(e)})") from None
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = directory / name
        if path.is_file():
            try:
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    return config, load_file(str(path))
                return config, torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise UserError(f"{path}: unreadable weights ({first_line(e)})") from None
    raise UserError(f"{directory}: no model.safetensors or pytorch_model.bin (sharded checkpoints are not read)")


def family_of(config: dict) -> str:
    kind = config.get("model_type")
    if kind not in (MARIAN, M2M100):
        raise UserError(f"config.json: model_type={kind!r} cannot be imported (marian or m2m_100)")
    return kind


def _same(config: dict, encoder_key: str, decoder_key: str) -> Any:
    if config.get(encoder_key) != config.get(decoder_key):
        raise UserError(
            f"config.json: {encoder_key}={config.get(encoder_key)} differs from {decoder_key}={config.get(decoder_key)}; we need one value"
        )
    return config[encoder_key]


def model_config(config: dict, family: str, forced_bos: int = -1) -> ModelConfig:
    """Our ModelConfig computing what transformers computes for ``config``."""
    for key, fine in REFUSED.items():
        if key in config and bool(config[key]) != fine:
            raise UserError(
                f"config.json: {key}={config[key]} cannot be mapped exactly (we support {key}={str(fine).lower()})"
            )
    if family == MARIAN and config.get("normalize_before"):
        raise UserError(
            "config.json: normalize_before=true: MarianMTModel is post-norm (transformers ignores the field); refusing the ambiguity"
        )
    activation = ACTIVATION_NAMES.get(config["activation_function"], config["activation_function"])
    if activation not in ACTIVATIONS:
        raise UserError(
            f"config.json: activation_function={config.get('activation_function')!r} is not supported ({', '.join(['swish', *ACTIVATIONS])})"
        )
    vocab = config["vocab_size"]
    shared = family == M2M100 or config.get("share_encoder_decoder_embeddings", True)
    pad = config["pad_token_id"]
    return ModelConfig(
        d_model=config["d_model"],
        n_heads=_same(config, "encoder_attention_heads", "decoder_attention_heads"),
        n_encoder_layers=config["encoder_layers"],
        n_decoder_layers=config["decoder_layers"],
        d_ff=config["encoder_ffn_dim"],
        decoder_d_ff=0 if config["decoder_ffn_dim"] == config["encoder_ffn_dim"] else config["decoder_ffn_dim"],
        dropout=config.get("dropout", 0.1),
        attention_dropout=config.get("attention_dropout", 0.0),
        activation_dropout=config.get("activation_dropout", 0.0),
        activation=activation,
        norm_first=family == M2M100,
        positional="sinusoidal" if family == MARIAN else "sinusoidal_fairseq",
        max_positions=config.get("max_position_embeddings", 1024),
        share_embeddings=shared,
        tie_output=config.get("tie_word_embeddings", True),
        src_vocab_size=vocab,
        tgt_vocab_size=vocab if shared else config.get("decoder_vocab_size") or vocab,
        scale_embedding=config["scale_embedding"],
        pad_id=pad,
        bos_id=config.get("decoder_start_token_id", pad),
        eos_id=config["eos_token_id"],
        forced_bos_id=forced_bos,
    )


def our_state_dict(weights: dict[str, Tensor], cfg: ModelConfig, family: str) -> dict[str, Tensor]:
    """Our weights from transformers' tensors, shapes checked against ``cfg``'s model."""
    expected = build_model(cfg).state_dict()
    state: dict[str, Tensor] = {}
    for name, theirs in weight_names(cfg, family):
        missing = [t for t in theirs if t not in weights]
        if missing:
            raise UserError(f"weights: no tensor {missing[0]} (config.json describes more layers than the file holds?)")
        state[name] = torch.cat([weights[t] for t in theirs])
    for name, theirs in embedding_names(cfg):
        found = next((t for t in theirs if t in weights), None)
        if found is None:
            raise UserError(f"weights: none of {', '.join(theirs)} found")
        state[name] = weights[found].reshape(-1) if name == "output.bias" else weights[found]
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise UserError(
                f"weights: {name} would be {list(tensor.shape)}, config.json implies {list(expected[name].shape)} (wrong shapes)"
            )
        state[name] = tensor.float()
    used = {t for _, theirs in weight_names(cfg, family) + embedding_names(cfg) for t in theirs} | {"final_logits_bias"}
    check_positions(weights, cfg)
    extra = sorted(k for k in weights if k not in used and "embed_positions" not in k)
    if extra:
        raise UserError(f"weights: tensor {extra[0]} has no counterpart in our model (an architecture we cannot map)")
    return state


def check_positions(weights: dict[str, Tensor], cfg: ModelConfig) -> None:
    """Stored position tables (older conversions keep them) must be the sinusoids we compute."""
    for name, table in weights.items():
        if "embed_positions" not in name:
            continue
        ours = sinusoid_table(cfg.max_positions, cfg.d_model, cfg.positional, cfg.pad_id)
        rows = (
            table[: cfg.max_positions]
            if cfg.positional == "sinusoidal"
            else table[cfg.pad_id + 1 : cfg.pad_id + 1 + cfg.max_positions]
        )
        if rows.shape != ours.shape or not torch.allclose(rows.float(), ours, atol=1e-4):
            raise UserError(
                f"weights: {name} is not the sinusoidal table transformers computes (learned positions cannot be imported)"
            )


def _index(path: Path) -> list[str]:
    """A vocab.json (piece -> id) as the list of pieces by id."""
    if not path.is_file():
        raise UserError(f"{path}: missing (the tokenizer's vocabulary)")
    vocab = json.loads(path.read_text(encoding="utf-8"))
    pieces = [""] * len(vocab)
    for piece, i in vocab.items():
        if not 0 <= i < len(vocab):
            raise UserError(f"{path}: id {i} of {piece!r} is outside 0..{len(vocab) - 1}")
        pieces[i] = piece
    return pieces


def _spm(path: Path) -> bytes:
    if not path.is_file():
        raise UserError(f"{path}: missing (the SentencePiece model)")
    return path.read_bytes()


def _fit(pieces: list[str], size: int, path: Path) -> list[str]:
    """The vocabulary padded with placeholder names up to the model's ``size`` rows."""
    if len(pieces) > size:
        raise UserError(f"{path}: {len(pieces)} pieces, more than the model's vocab_size={size}")
    return pieces + [f"<unused{i}>" for i in range(len(pieces), size)]


def marian_tokenizer(directory: Path, cfg: ModelConfig, config: dict) -> MappedTokenizer:
    """source.spm + target.spm over vocab.json (and target_vocab.json when separate)."""
    tok_cfg = _tokenizer_config(directory)
    src = _fit(_index(directory / "vocab.json"), cfg.src_vocab_size, directory / "vocab.json")
    tgt = None
    if tok_cfg.get("separate_vocabs") or not cfg.share_embeddings and (directory / "target_vocab.json").is_file():
        tgt = _fit(_index(directory / "target_vocab.json"), cfg.tgt_vocab_size, directory / "target_vocab.json")
    unk_piece = tok_cfg.get("unk_token", "<unk>")
    if unk_piece not in src:
        raise UserError(f"{directory / 'vocab.json'}: no {unk_piece!r} piece")
    unk = src.index(unk_piece)
    return MappedTokenizer(
        _spm(directory / "source.spm"),
        _spm(directory / "target.spm"),
        src,
        tgt,
        unk=unk,
        eos=cfg.eos_id,
        bos=cfg.bos_id,
        pad=cfg.pad_id,
        special=[cfg.eos_id, unk, cfg.pad_id],
    )


def m2m100_tokenizer(
    directory: Path, cfg: ModelConfig, config: dict, src_lang: str | None, tgt_lang: str | None
) -> MappedTokenizer:
    """sentencepiece.bpe.model over vocab.json, then one __xx__ token per language, in
    transformers' order; sources open with the source language, targets with the target's."""
    from transformers.models.m2m_100.tokenization_m2m_100 import FAIRSEQ_LANGUAGE_CODES

    tok_cfg = _tokenizer_config(directory)
    if not src_lang or not tgt_lang:
        raise UserError(
            "an M2M100 model translates between many languages: give src_lang= and tgt_lang= (e.g. src_lang=en tgt_lang=de)"
        )
    codes = FAIRSEQ_LANGUAGE_CODES.get(tok_cfg.get("language_codes", "m2m100"))
    if codes is None:
        raise UserError(
            f"tokenizer_config.json: language_codes={tok_cfg.get('language_codes')!r} is unknown to transformers"
        )
    pieces = _index(directory / "vocab.json")
    langs = [f"__{code}__" for code in codes]
    vocab = _fit(pieces + langs, cfg.src_vocab_size, directory / "vocab.json")
    for lang in (src_lang, tgt_lang):
        if f"__{lang}__" not in langs:
            raise UserError(f"language {lang!r} is not one of the model's: {', '.join(codes)}")
    if tok_cfg.get("unk_token", "<unk>") not in pieces:
        raise UserError(f"{directory / 'vocab.json'}: no {tok_cfg.get('unk_token', '<unk>')!r} piece")
    unk = pieces.index(tok_cfg.get("unk_token", "<unk>"))
    sp = _spm(directory / tok_cfg.get("spm_file", "sentencepiece.bpe.model"))
    src_id, tgt_id = vocab.index(f"__{src_lang}__"), vocab.index(f"__{tgt_lang}__")
    special = [config.get("bos_token_id", 0), cfg.pad_id, cfg.eos_id, unk] + list(range(len(pieces), len(vocab)))
    return MappedTokenizer(
        sp,
        sp,
        vocab,
        None,
        unk=unk,
        eos=cfg.eos_id,
        bos=cfg.bos_id,
        pad=cfg.pad_id,
        special=special,
        src_prefix=[src_id],
        tgt_prefix=[tgt_id],
    )


def _tokenizer_config(directory: Path) -> dict:
    path = directory / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def import_directory(directory: str | Path, src_lang: str | None = None, tgt_lang: str | None = None) -> dict:
    """Our checkpoint dict (model config, weights, tokenizer) for a local model directory. A
    directory written by transformer-export carries our tokenizer and gets it back as it was."""
    directory = Path(directory)
    config, weights = read_directory(directory)
    family = family_of(config)
    config = DEFAULTS[family] | config
    try:
        cfg = model_config(config, family)
    except KeyError as e:
        raise UserError(f"{directory / 'config.json'}: no {e.args[0]} field") from None
    saved = Tokenizer.load(directory)
    if saved is not None:
        tokenizer = saved
    elif family == MARIAN:
        tokenizer = marian_tokenizer(directory, cfg, config)
    else:
        tokenizer = m2m100_tokenizer(directory, cfg, config, src_lang, tgt_lang)
    if family == M2M100 and isinstance(tokenizer, MappedTokenizer) and tokenizer.tgt_prefix:
        cfg.forced_bos_id = tokenizer.tgt_prefix[0]
    elif config.get("forced_bos_token_id") is not None:
        cfg.forced_bos_id = config["forced_bos_token_id"]
    bias = weights.get("final_logits_bias")
    cfg.final_logits_bias = family == MARIAN and bias is not None and bool(bias.abs().sum() > 0)
    if (tokenizer.src_vocab_size, tokenizer.tgt_vocab_size) != (cfg.src_vocab_size, cfg.tgt_vocab_size):
        raise UserError(
            f"{directory}: the tokenizer has {tokenizer.src_vocab_size}/{tokenizer.tgt_vocab_size} pieces, config.json vocab_size says {cfg.src_vocab_size}/{cfg.tgt_vocab_size}"
        )
    state = our_state_dict(weights, cfg, family)
    return {
        "format": FORMAT,
        "model": state,
        "model_config": to_dict(cfg),
        "tokenizer": tokenizer.to_state(),
        "imported_from": str(directory),
    }


def resolve_source(source: str) -> Path:
    """A local directory as it is; a hub name through transformers' own download only when
    online (HF_HUB_OFFLINE unset), saved to a temporary directory and read from there."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"hf={source}: a file, not a model directory")
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:  # a path, not a hub name (org/name)
        raise UserError(f"hf={source}: no such directory")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise UserError(f"hf={source}: no such directory, and HF_HUB_OFFLINE is set, so it is not looked up on the hub")
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="transformer-import-"))
    try:
        AutoModelForSeq2SeqLM.from_pretrained(source).save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(source).save_pretrained(str(tmp))
    except Exception as e:
        raise UserError(
            f"hf={source}: no such directory, and transformers could not load it from the hub ({first_line(e)})"
        ) from None
    return tmp


def import_hf(source: str, output: str, src_lang: str | None = None, tgt_lang: str | None = None) -> Path:
    """Write the checkpoint of a model directory (atomically) and return its path."""
    out = Path(output)
    atomic_save(import_directory(resolve_source(source), src_lang, tgt_lang), out)
    return out


USAGE = """usage: transformer-import hf=DIR output=CKPT.pt [src_lang=en tgt_lang=de]

Reads a local Hugging Face MarianMTModel (OPUS-MT) or M2M100ForConditionalGeneration directory (config.json,
model.safetensors or pytorch_model.bin, tokenizer files) and writes our checkpoint: decode, evaluate, fine-tune
(transformer-train trainer.init_from=CKPT) and export it like a model trained here. M2M100 needs src_lang and tgt_lang."""


@dataclass
class ImportConfig:
    hf: str = MISSING  # a local model directory (a hub name only when online)
    output: str = MISSING  # the checkpoint to write
    src_lang: str | None = None  # M2M100: source language code (its __xx__ token opens every source)
    tgt_lang: str | None = None  # M2M100: target language code (forced as the first output token)


def run_import(cfg: ImportConfig) -> None:
    out = import_hf(cfg.hf, cfg.output, cfg.src_lang, cfg.tgt_lang)
    print(f"checkpoint: {out}")
