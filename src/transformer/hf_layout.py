"""How our weights are laid out in Hugging Face's MarianMTModel and M2M100: one name table
that export.py writes and import_hf.py reads, so the two directions cannot drift apart."""

from __future__ import annotations

from transformer.config import ModelConfig

MARIAN, M2M100 = "marian", "m2m_100"


def weight_names(cfg: ModelConfig, family: str) -> list[tuple[str, tuple[str, ...]]]:
    """The name table shared by export and import: each of our weights with the transformers
    tensors it is made of, concatenated along the first dimension (fused q|k|v and k|v
    projections). Embeddings and the output layer are in ``embedding_names``."""
    table: list[tuple[str, tuple[str, ...]]] = []

    def linear(ours: str, *theirs: str) -> None:
        for part in ("weight", "bias"):
            table.append((f"{ours}.{part}", tuple(f"{t}.{part}" for t in theirs)))

    def layer(o: str, h: str, self_sub: str, cross: bool) -> None:
        linear(f"{o}.self_attn.qkv", *(f"{h}.self_attn.{n}_proj" for n in "qkv"))
        linear(f"{o}.self_attn.out", f"{h}.self_attn.out_proj")
        linear(f"{o}.{self_sub}.norm", f"{h}.self_attn_layer_norm")
        if cross:
            linear(f"{o}.cross_attn.q", f"{h}.encoder_attn.q_proj")
            linear(f"{o}.cross_attn.kv", f"{h}.encoder_attn.k_proj", f"{h}.encoder_attn.v_proj")
            linear(f"{o}.cross_attn.out", f"{h}.encoder_attn.out_proj")
            linear(f"{o}.cross_sub.norm", f"{h}.encoder_attn_layer_norm")
        linear(f"{o}.ffn.fc1", f"{h}.fc1")
        linear(f"{o}.ffn.fc2", f"{h}.fc2")
        linear(f"{o}.ffn_sub.norm", f"{h}.final_layer_norm")

    for i in range(cfg.n_encoder_layers):
        layer(f"encoder.{i}", f"model.encoder.layers.{i}", "attn_sub", cross=False)
    for i in range(cfg.n_decoder_layers):
        layer(f"decoder.{i}", f"model.decoder.layers.{i}", "self_sub", cross=True)
    if family == M2M100:
        linear("encoder_norm", "model.encoder.layer_norm")
        linear("decoder_norm", "model.decoder.layer_norm")
    return table


def embedding_names(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """Our embedding and output weights with every transformers name that holds a copy: export
    writes them all (with tie_word_embeddings=false transformers unties the shared ones too),
    import reads the first one present (files saved by transformers leave tied copies out)."""
    shared = ("model.shared.weight",) if cfg.share_embeddings else ()
    tgt = ("model.decoder.embed_tokens.weight",) + shared
    names = [
        ("src_embed.tokens.weight", ("model.encoder.embed_tokens.weight",) + shared),
        ("tgt_embed.tokens.weight", tgt),
        ("output.weight", ("lm_head.weight",) + (tgt if cfg.tie_output else ())),
    ]
    if cfg.final_logits_bias:
        names.append(("output.bias", ("final_logits_bias",)))  # (1, V) in transformers
    return names
