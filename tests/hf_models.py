"""Small random Hugging Face models with OPUS-MT and M2M100 conventions, written to local
directories as transformers itself saves them (no network): the inputs of test_import_hf
and of ``scripts/bench_decode.py --hf``."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
import torch

from transformer.data.builtin import generate_pairs


def train_spm(sentences: Sequence[str], vocab_size: int) -> bytes:
    """A unigram SentencePiece model (as OPUS-MT ships): <unk>=0, <s>=1, </s>=2, no <pad>."""
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=proto,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return proto.getvalue()


def pieces_of(proto: bytes) -> list[str]:
    sp = spm.SentencePieceProcessor(model_proto=proto)
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def opus_vocab(src_proto: bytes, tgt_proto: bytes, extra: Sequence[str] = (), size: int = 0) -> dict[str, int]:
    """OPUS-MT's joint vocab.json: </s>=0, <unk>=1, the pieces of both models (and ``extra``,
    e.g. >>deu<< tags), filler up to ``size``, and <pad> last."""
    pieces = ["</s>", "<unk>"]
    for p in [*extra, *pieces_of(src_proto), *pieces_of(tgt_proto)]:
        if p not in pieces and p not in ("<s>",):
            pieces.append(p)
    pieces += [f"▁filler{i}" for i in range(max(size - 1 - len(pieces), 0))]
    return {p: i for i, p in enumerate(pieces + ["<pad>"])}


def spread(model: torch.nn.Module) -> torch.nn.Module:
    """Xavier-uniform matrices (transformers' N(0, 0.02) makes a random model's output the
    same few tokens whatever the input); the padding rows stay zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                pad = model.config.pad_token_id
                torch.nn.init.xavier_uniform_(p)
                if "embed_tokens" in name or "shared" in name:
                    p[pad].zero_()
    return model


def write_marian(
    directory: Path,
    *,
    d_model: int = 32,
    layers: int = 2,
    heads: int = 4,
    ffn: int = 64,
    vocab_size: int = 0,
    spm_size: int = 80,
    seed: int = 0,
    eos_boost: float = 0.5,
    pairs: int = 300,
    separate: bool = False,
) -> Path:
    """A random MarianMTModel with an OPUS-MT config and tokenizer in ``directory``: separate
    source.spm/target.spm, one vocab.json, swish, pad = decoder start = last id, eos = 0, a
    non-zero final_logits_bias (EOS raised by ``eos_boost`` so beams end after a few tokens).
    ``separate``: vocab.json for the source, target_vocab.json for the target (two embeddings)."""
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    data = generate_pairs(pairs, seed=7)
    src_proto, tgt_proto = train_spm([s for s, _ in data], spm_size), train_spm([t for _, t in data], spm_size)
    vocab = opus_vocab(src_proto, tgt_proto, [">>deu<<", ">>nld<<"], vocab_size)
    target_vocab = opus_vocab(tgt_proto, tgt_proto, (), len(vocab)) if separate else None
    directory.mkdir(parents=True, exist_ok=True)
    if separate:
        vocab = opus_vocab(src_proto, src_proto, [">>deu<<", ">>nld<<"], len(target_vocab))
        (directory / "target_vocab.json").write_text(json.dumps(target_vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "source.spm").write_bytes(src_proto)
    (directory / "target.spm").write_bytes(tgt_proto)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    pad = len(vocab) - 1
    config = MarianConfig(
        vocab_size=len(vocab),
        decoder_vocab_size=len(vocab),
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        activation_function="swish",
        max_position_embeddings=512 if d_model >= 256 else 64,
        scale_embedding=True,
        pad_token_id=pad,
        eos_token_id=0,
        decoder_start_token_id=pad,
        forced_eos_token_id=0,
        dropout=0.0,
        share_encoder_decoder_embeddings=not separate,
        architectures=["MarianMTModel"],
    )
    torch.manual_seed(seed)
    model = spread(MarianMTModel(config))
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, 0.1)
        model.final_logits_bias[0, 0] += eos_boost
    model.generation_config.bad_words_ids = [[pad]]
    model.save_pretrained(str(directory))
    MarianTokenizer(
        str(directory / "source.spm"),
        str(directory / "target.spm"),
        str(directory / "vocab.json"),
        target_vocab_file=str(directory / "target_vocab.json") if separate else None,
        separate_vocabs=separate,
    ).save_pretrained(str(directory))
    return directory


def write_m2m100(directory: Path, *, seed: int = 0, eos_boost: float = 1.5) -> Path:
    """A random M2M100ForConditionalGeneration (2+2 layers, d_model 32) with an M2M100Tokenizer
    directory: sentencepiece.bpe.model, vocab.json (<s>=0, <pad>=1, </s>=2, <unk>=3, pieces),
    then transformers' 100 language tokens and 8 made-up words."""
    from transformers import M2M100Config, M2M100ForConditionalGeneration, M2M100Tokenizer

    data = generate_pairs(300, seed=7)
    proto = train_spm([s for pair in data for s in pair], 100)
    pieces = ["<s>", "<pad>", "</s>", "<unk>"] + [p for p in pieces_of(proto) if p not in ("<s>", "</s>", "<unk>")]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sentencepiece.bpe.model").write_bytes(proto)
    (directory / "vocab.json").write_text(
        json.dumps({p: i for i, p in enumerate(pieces)}, ensure_ascii=False), encoding="utf-8"
    )
    config = M2M100Config(
        vocab_size=len(pieces) + 108,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        architectures=["M2M100ForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = spread(M2M100ForConditionalGeneration(config))
    with torch.no_grad():  # raise EOS through the decoder's last LayerNorm bias (M2M100 has no logits bias)
        row = model.lm_head.weight[2]
        model.model.decoder.layer_norm.bias.copy_(eos_boost * row / row.norm() ** 2)
    model.save_pretrained(str(directory))
    M2M100Tokenizer(
        str(directory / "vocab.json"), str(directory / "sentencepiece.bpe.model"), src_lang="en", tgt_lang="de"
    ).save_pretrained(str(directory))
    return directory
