"""From source id lists to hypotheses: check the decode settings and guides, settle ``auto``
for the device, cut over-long sources, batch the sentences by length, search each batch,
and hand the results back in input order (decode, evaluate and validation BLEU all come
through ``translate_ids``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from transformer.config import DecodeConfig
from transformer.data.batching import pad, token_batches
from transformer.decode.fast import log_choice, required_tokens, resolve_shortlist
from transformer.decode.guides import check_guides
from transformer.decode.prepare import prepare_models, resolve_decode
from transformer.decode.rules import Hypothesis
from transformer.decode.scorer import make_scorer
from transformer.decode.search import search
from transformer.decode.shortlist import Shortlist
from transformer.decode.spec import SearchSpec, check_decode_config
from transformer.errors import UserError
from transformer.model import Transformer
from transformer.runtime import autocast
from transformer.vocab import EOS

log = logging.getLogger(__name__)


def fit_source(ids: list[int], limit: int, line: int, eos: int = EOS) -> list[int]:
    """Sources longer than the model's positions are cut (keeping EOS), with a warning:
    one over-long line must not stop a whole file."""
    if len(ids) <= limit:
        return ids
    log.warning(
        "input line %d has %d subwords, more than model.max_positions=%d: translating its first %d",
        line,
        len(ids),
        limit,
        limit - 1,
    )
    return ids[: limit - 1] + [eos]


def translate_ids(
    models: Sequence[Transformer],
    src_ids: Sequence[list[int]],
    cfg: DecodeConfig,
    cached: bool = True,
    first_line: int = 1,
    prefixes: Sequence[list[int]] | None = None,
    constraints: Sequence[list[list[int]]] | None = None,
    shortlist: Shortlist | None = None,
) -> list[list[Hypothesis]]:
    """Hypotheses for every source (id lists ending in EOS), in input order; warnings number
    the sources from ``first_line``. ``prefixes`` (target ids, without BOS) and ``constraints``
    (target id phrases) hold one entry per source, empty for none. ``shortlist``: the table
    decode.shortlist resolved to (default: a path in decode.shortlist, none for auto)."""
    check_decode_config(cfg)
    model = models[0]
    device = next(model.parameters()).device
    cfg = resolve_decode(cfg, device, model)
    shortlist = shortlist or resolve_shortlist(cfg, None, model.cfg.tgt_vocab_size)
    log_choice(cfg.precision, cfg.quantize, "a vocabulary shortlist" if shortlist else "the full vocabulary")
    limit, specials = model.cfg.max_positions, model.specials
    src_ids = [fit_source(ids, limit, first_line + i, specials.eos) for i, ids in enumerate(src_ids)]
    check_guides(src_ids, prefixes, constraints, cfg, limit, first_line)
    if cfg.alignment and cfg.alignment_layer >= model.cfg.n_decoder_layers:
        layers = model.cfg.n_decoder_layers
        raise UserError(f"decode.alignment_layer={cfg.alignment_layer}: the model has {layers} decoder layers")
    models = prepare_models(models, cfg, device)
    align_layer = cfg.alignment_layer if cfg.alignment else None
    spec = SearchSpec.of(cfg, limit, specials)
    results: list[list[Hypothesis]] = [[] for _ in src_ids]
    with torch.inference_mode(), autocast(device, cfg.precision, "decode.precision"):
        for batch in token_batches([len(s) for s in src_ids], cfg.batch_tokens, 0, 0, shuffle=False):
            src = pad([src_ids[i] for i in batch], specials.pad).to(device)
            prefix = None if prefixes is None else [prefixes[i] for i in batch]
            phrases = None if constraints is None else [constraints[i] for i in batch]
            vocab = None
            if shortlist is not None:
                vocab = shortlist.candidates(src, required_tokens(specials.eos, specials.forced_bos, prefix, phrases))
            scorer = make_scorer(models, cached, align_layer, vocab)
            for i, hyps in zip(batch, search(scorer, src, spec, prefix, phrases)):
                results[i] = hyps
                if hyps and not hyps[0].constraints_met:
                    log.warning(
                        "input line %d: no output within the length limit holds every constraint", first_line + i
                    )
    return results
