"""Export a checkpoint as a Hugging Face model directory, and from there to CTranslate2.

Why these two targets: ``transformers`` is how most people load, share and serve a
translation model, and CTranslate2 is the fastest CPU runtime for it. Nothing is
approximated: a post-norm model *is* a ``MarianMTModel`` and a pre-norm model with
fairseq positions *is* an ``M2M100ForConditionalGeneration`` once the fused Q/K/V
matrices are split, so the export gives the same logits (to float rounding) and the
same greedy and beam outputs. Combinations neither class can express (learned or rotary
positions, RMSNorm, gated feed-forward blocks; post-norm with fairseq positions; pre-norm
with paper positions or with separate source/target embeddings) are refused with a
``UserError`` that says what to train instead.

    transformer-export checkpoint=runs/multi30k output=export/multi30k [ct2=export/multi30k-ct2 quantization=int8]
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING
from torch import Tensor

from transformer.config import ModelConfig
from transformer.data.tokenizer import MappedTokenizer, Tokenizer
from transformer.errors import UserError
from transformer.hf_layout import M2M100, MARIAN, embedding_names, weight_names
from transformer.model import Transformer
from transformer.vocab import EOS, PAD, UNK, Specials

# model options MarianMTModel and M2M100 have no counterpart for: (key, value, what the classes use instead)
NOT_IN_HF = (
    ("norm", "rmsnorm", "LayerNorm"),
    ("activation", "swiglu", "an ungated feed-forward block (relu, gelu or silu)"),
    ("activation", "geglu", "an ungated feed-forward block (relu, gelu or silu)"),
    ("positional", "rope", "sinusoids added to the embeddings, no rotary attention"),
)


def hf_family(cfg: ModelConfig) -> str:
    """The Hugging Face architecture that computes exactly what ``cfg`` does, or a UserError."""
    for key, value, instead in NOT_IN_HF:
        if getattr(cfg, key) == value:
            raise UserError(f"model.{key}={value} cannot be exported: MarianMTModel and M2M100 use {instead}")
    if cfg.positional == "learned":
        raise UserError(
            "model.positional=learned cannot be exported: Marian and M2M100 use fixed sinusoids "
            "(train with model.positional=sinusoidal for post-norm or sinusoidal_fairseq for pre-norm)"
        )
    if not cfg.norm_first:
        if cfg.positional != "sinusoidal":
            raise UserError(
                f"post-norm models export as MarianMTModel, which uses model.positional=sinusoidal, not {cfg.positional} "
                "(train with model.positional=sinusoidal, or model.norm_first=true to export as M2M100)"
            )
        return MARIAN
    if cfg.positional != "sinusoidal_fairseq":
        raise UserError(
            f"pre-norm models export as M2M100ForConditionalGeneration, which uses model.positional=sinusoidal_fairseq, "
            f"not {cfg.positional} (train with model.positional=sinusoidal_fairseq, or model.norm_first=false to export as Marian)"
        )
    if not cfg.share_embeddings:
        raise UserError(
            "pre-norm models export as M2M100, which shares one embedding between source and target: "
            "train with model.share_embeddings=true and data.joint_vocab=true (or post-norm, which Marian exports either way)"
        )
    if cfg.final_logits_bias:
        raise UserError("model.final_logits_bias=true: M2M100, which pre-norm models export as, has no output bias")
    return M2M100


def hf_config(cfg: ModelConfig, family: str) -> Any:
    """The transformers config of the same shapes, special ids and dropout rates."""
    from transformers import M2M100Config, MarianConfig

    common = dict(
        vocab_size=cfg.src_vocab_size,
        d_model=cfg.d_model,
        max_position_embeddings=cfg.max_positions,
        encoder_layers=cfg.n_encoder_layers,
        decoder_layers=cfg.n_decoder_layers,
        encoder_attention_heads=cfg.n_heads,
        decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.d_ff,
        decoder_ffn_dim=cfg.decoder_d_ff or cfg.d_ff,
        activation_function=cfg.activation,
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        activation_dropout=cfg.activation_dropout,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        scale_embedding=cfg.scale_embedding,
        pad_token_id=cfg.pad_id,
        bos_token_id=cfg.bos_id,
        eos_token_id=cfg.eos_id,
        decoder_start_token_id=cfg.bos_id,
        forced_eos_token_id=cfg.eos_id,
        tie_word_embeddings=cfg.tie_output,
    )
    if cfg.forced_bos_id >= 0:
        common["forced_bos_token_id"] = cfg.forced_bos_id
    if family == MARIAN:
        return MarianConfig(
            **common,
            decoder_vocab_size=cfg.tgt_vocab_size,
            share_encoder_decoder_embeddings=cfg.share_embeddings,
            architectures=["MarianMTModel"],
        )
    return M2M100Config(**common, architectures=["M2M100ForConditionalGeneration"])


def hf_state_dict(model: Transformer, family: str) -> dict[str, Tensor]:
    """Our weights under the transformers names (fixed position tables left out)."""
    ours = model.state_dict()
    state: dict[str, Tensor] = {}
    for name, theirs in weight_names(model.cfg, family):
        state |= dict(zip(theirs, ours[name].chunk(len(theirs))))
    for name, theirs in embedding_names(model.cfg):
        tensor = ours[name][None] if name == "output.bias" else ours[name]
        state |= dict.fromkeys(theirs if name != "output.weight" else theirs[:1], tensor)
    return {k: v.detach().float().clone() for k, v in state.items()}


def to_hf(model: Transformer) -> Any:
    """A transformers model (eval mode, float32) computing what ``model`` computes."""
    from transformers import M2M100ForConditionalGeneration, MarianMTModel

    family = hf_family(model.cfg)
    config = hf_config(model.cfg, family)
    cls = MarianMTModel if family == MARIAN else M2M100ForConditionalGeneration
    hf = cls(config)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model, family), strict=False)
    # Left to transformers: the sinusoid tables it builds itself and Marian's zero logits bias.
    derived = ("embed_positions.weight", "embed_positions.weights", "final_logits_bias")
    leftover = [k for k in missing if not k.endswith(derived)]
    if unexpected or leftover:
        raise RuntimeError(
            f"export mapping is out of date with transformers: unexpected {unexpected}, missing {leftover}"
        )
    hf.tie_weights()
    return hf.eval()


def _vocab(processor_proto: bytes) -> dict[str, int]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=processor_proto)
    return {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}


def _vocabularies(tokenizer: Tokenizer) -> tuple[dict[str, int], dict[str, int] | None, dict[str, str]]:
    """vocab.json, target_vocab.json (None when shared) and the unk/eos/pad pieces."""
    if isinstance(tokenizer, MappedTokenizer):
        index = lambda vocab: {p: i for i, p in reversed(list(enumerate(vocab)))}  # noqa: E731 (first id of a repeated piece)
        pieces = {k: tokenizer.src_vocab[tokenizer.ids[k]] for k in ("unk", "eos", "pad")}
        return index(tokenizer.src_vocab), None if tokenizer.joint else index(tokenizer.tgt_vocab), pieces
    pieces = {
        "unk": tokenizer.src.id_to_piece(UNK),
        "eos": tokenizer.src.id_to_piece(EOS),
        "pad": tokenizer.src.id_to_piece(PAD),
    }
    return _vocab(tokenizer.src_proto), None if tokenizer.joint else _vocab(tokenizer.tgt_proto), pieces


def save_hf_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """SentencePiece models plus a ``MarianTokenizer`` (source.spm, target.spm, vocab.json) that
    ``AutoTokenizer`` loads for either architecture: pieces + ``</s>`` with our ids."""
    from transformers import MarianTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        src, tgt = Path(tmp, "source.spm"), Path(tmp, "target.spm")
        src.write_bytes(tokenizer.src_proto)
        tgt.write_bytes(tokenizer.tgt_proto)
        src_vocab, tgt_vocab, pieces = _vocabularies(tokenizer)
        Path(tmp, "vocab.json").write_text(json.dumps(src_vocab, ensure_ascii=False), encoding="utf-8")
        target_vocab = None
        if tgt_vocab is not None:
            target_vocab = Path(tmp, "target_vocab.json")
            target_vocab.write_text(json.dumps(tgt_vocab, ensure_ascii=False), encoding="utf-8")
        hf_tok = MarianTokenizer(
            source_spm=str(src),
            target_spm=str(tgt),
            vocab=str(Path(tmp, "vocab.json")),
            target_vocab_file=str(target_vocab) if target_vocab else None,
            separate_vocabs=not tokenizer.joint,
            unk_token=pieces["unk"],
            eos_token=pieces["eos"],
            pad_token=pieces["pad"],
        )
        hf_tok.save_pretrained(str(directory))
    tokenizer.save(
        directory
    )  # our own files too (spm.model, ...; tokenizer_state.json): transformer-import reads them back


def generation_config(beam_size: int, max_length: int, specials: Specials = Specials()) -> Any:
    """Defaults for ``generate()`` that mirror our search: start from BOS, never emit PAD or BOS,
    EOS forced at the last position, beam scores = log-prob / length (``lp_style=average``),
    stop a sentence once ``beam_size`` hypotheses finished (``early_stop=fairseq``)."""
    from transformers import GenerationConfig

    forced = dict(forced_bos_token_id=specials.forced_bos) if specials.forced_bos >= 0 else {}
    return GenerationConfig(
        num_beams=beam_size,
        max_length=max_length,
        length_penalty=1.0,
        early_stopping=True,
        bos_token_id=specials.bos,
        eos_token_id=specials.eos,
        pad_token_id=specials.pad,
        decoder_start_token_id=specials.bos,
        forced_eos_token_id=specials.eos,
        suppress_tokens=list(specials.never_generated),
        **forced,
    )


def export(checkpoint: str, output: str, beam_size: int = 5, max_length: int | None = None) -> Path:
    """Write a transformers model directory (weights, config, generation config, tokenizer)."""
    from transformer.checkpoint import load_model

    model, tokenizer, _ = load_model(checkpoint)
    hf = to_hf(model)
    hf.generation_config = generation_config(beam_size, max_length or min(model.cfg.max_positions, 256), model.specials)
    out = Path(output)
    hf.save_pretrained(str(out))
    save_hf_tokenizer(tokenizer, out)
    return out


def _pieces(vocab: dict[str, int]) -> list[str]:
    """A piece -> id mapping as the list of pieces in id order."""
    return [piece for piece, _ in sorted(vocab.items(), key=lambda item: item[1])]


def _ct2_loader(family: str, pad_id: int = PAD) -> Any:
    """A CTranslate2 loader for our exports. The stock Marian loader assumes OPUS-MT conventions
    (PAD is the last piece and dropped; the decoder starts from a zero vector) and the stock
    M2M100 loader assumes PAD=1; ours start from BOS and have PAD=0 (an imported model: its own ids)."""
    from ctranslate2.converters.transformers import BartLoader

    class ExportLoader(BartLoader):
        @property
        def architecture_name(self) -> str:
            return "MarianMTModel" if family == MARIAN else "M2M100ForConditionalGeneration"

        def get_model_spec(self, model):
            model.config.normalize_before = family == M2M100
            model.config.normalize_embedding = False
            return super().get_model_spec(model)

        def set_position_encodings(self, spec, module):
            # Marian's table starts at position 0; M2M100's row PAD+1 holds the first position.
            spec.encodings = module.weight if family == MARIAN else module.weights[pad_id + 1 :]

        def get_vocabulary(self, model, tokenizer):
            target = tokenizer.target_encoder if tokenizer.separate_vocabs else tokenizer.encoder
            return _pieces(tokenizer.encoder), _pieces(target)

        def set_vocabulary(self, spec, tokens):
            spec.register_source_vocabulary(tokens[0])
            spec.register_target_vocabulary(tokens[1])

        def set_config(self, config, model, tokenizer):
            pieces = _pieces(tokenizer.target_encoder if tokenizer.separate_vocabs else tokenizer.encoder)
            start, eos = model.config.decoder_start_token_id, model.config.eos_token_id
            config.bos_token, config.eos_token, config.unk_token = pieces[start], pieces[eos], tokenizer.unk_token
            config.decoder_start_token = pieces[start]

    return ExportLoader()


def convert_ct2(hf_dir: str | Path, output: str | Path, quantization: str | None = None, force: bool = True) -> Path:
    """Convert an export to a CTranslate2 model directory (``quantization``: int8, int8_float32,
    float16, ...; None keeps float32). Uses ``ctranslate2.converters.TransformersConverter``
    with a loader that knows our special ids."""
    try:
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        raise UserError(
            "ctranslate2 is not installed: pip install 'transformer[ct2]' (or pip install ctranslate2)"
        ) from None
    from transformers import AutoModelForSeq2SeqLM, MarianTokenizer

    class ExportConverter(TransformersConverter):
        def _load(self):
            model = AutoModelForSeq2SeqLM.from_pretrained(self._model_name_or_path)
            tokenizer = MarianTokenizer.from_pretrained(self._model_name_or_path)
            return _ct2_loader(model.config.model_type, model.config.pad_token_id)(model, tokenizer)

    return Path(ExportConverter(str(hf_dir)).convert(str(output), quantization=quantization, force=force))


USAGE = """usage: transformer-export checkpoint=RUN_DIR_OR_PT output=DIR [beam_size=5] [max_length=N] [ct2=DIR] [quantization=int8]

Writes a Hugging Face model directory (MarianMTModel for post-norm models, M2M100ForConditionalGeneration
for pre-norm ones) with its tokenizer and generation config; with ct2=DIR also a CTranslate2 model."""


@dataclass
class ExportConfig:
    checkpoint: str = MISSING  # run directory (uses best.pt) or checkpoint file
    output: str = MISSING  # the Hugging Face model directory to write
    beam_size: int = 5  # generation_config default
    max_length: int | None = None  # generation_config limit (default: the model's positions, at most 256)
    ct2: str | None = None  # also convert for CTranslate2 into this directory
    quantization: str | None = None  # CTranslate2 weights: int8, int8_float32, ... (needs ct2)


def run_export(cfg: ExportConfig) -> None:
    if cfg.quantization and not cfg.ct2:
        raise UserError("quantization= applies to the CTranslate2 model: give ct2=DIR too")
    for key in ("output", "ct2"):
        if (target := getattr(cfg, key)) and Path(target).expanduser().is_file():
            raise UserError(f"{key}={target}: a file is there, and the export writes a directory (give another path)")
    out = export(cfg.checkpoint, cfg.output, cfg.beam_size, cfg.max_length)
    print(f"transformers model: {out}")
    if cfg.ct2:
        print(f"CTranslate2 model: {convert_ct2(out, cfg.ct2, cfg.quantization)}")
