"""What a search is asked to do, settled once: ``check_decode_config`` names a wrong decode key
before any work starts (the CLI's error line and the server's 422 both come from it), and
``SearchSpec`` is the frozen set of settings every search function reads, built from a
``DecodeConfig`` once instead of passing the config or a dozen arguments around."""

from __future__ import annotations

from dataclasses import dataclass, fields

from transformer.config import DecodeConfig, validate_section
from transformer.errors import UserError
from transformer.vocab import Specials


def check_decode_config(cfg: DecodeConfig) -> None:
    """Every range and choice of the decode section (``config.RANGES``/``CHOICES``), then the one
    check across keys: a beam returns at most beam_size hypotheses."""
    validate_section("decode", cfg)
    if not cfg.sampling and cfg.n_best > cfg.beam_size:
        raise UserError(
            f"decode.n_best={cfg.n_best} is larger than beam_size={cfg.beam_size}: a beam holds at most that many"
        )


@dataclass(frozen=True)
class SearchSpec:
    """The settings of one search (see ``search`` for the conventions they follow)."""

    beam_size: int = 5
    n_best: int = 1
    length_penalty: float = 1.0  # alpha of ``lp_style``
    lp_style: str = "gnmt"  # gnmt | average | none
    early_stop: str = "exact"  # exact | fairseq
    max_len_a: float = 1.5  # at most floor(a * source length + b) generated tokens, EOS included
    max_len_b: int = 10
    max_len_limit: int = 1024  # and never more than this (the model's positions less BOS)
    min_len: int = 0  # EOS forbidden before this many tokens
    specials: Specials = Specials()
    sampling: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    alignment: bool = False  # give every hypothesis, per token, the source position attended most

    @classmethod
    def of(cls, cfg: DecodeConfig, max_positions: int, specials: Specials = Specials()) -> SearchSpec:
        """The search ``cfg`` asks for (its keys of the same names), on a model with ``max_positions`` positions."""
        keys = {f.name for f in fields(DecodeConfig)}
        shared = {f.name: getattr(cfg, f.name) for f in fields(cls) if f.name in keys}
        return cls(**shared, max_len_limit=max_positions - 1, specials=specials)
