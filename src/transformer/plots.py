"""Pictures: the cross-attention heat map behind ``transformer-decode plot_attention=FILE``.

matplotlib is an optional extra (``pip install 'transformer[plot]'``), imported only when a
picture is asked for. Figures are drawn on a ``Figure`` of their own rather than through
pyplot, so nothing here switches the backend of a notebook or GUI the caller runs in.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from textwrap import shorten
from typing import TYPE_CHECKING, Any

from torch import Tensor

from transformer.errors import UserError
from transformer.rundir import atomic_file

if TYPE_CHECKING:
    from transformer.decode.translator import Translation, Translator

MISSING_MATPLOTLIB = (
    "plots need matplotlib, which is not installed: pip install 'transformer[plot]' (or pip install matplotlib)"
)


def require_matplotlib() -> type:
    """matplotlib's ``Figure`` class, or a UserError that names the extra to install."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(MISSING_MATPLOTLIB) from None
    return Figure


def new_figure(**kwargs: Any) -> Any:
    """A matplotlib ``Figure`` of its own (rendered with Agg when saved)."""
    return require_matplotlib()(**kwargs)


def plot_attention(
    weights: Tensor, src_pieces: Sequence[str], tgt_pieces: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Write a heat map of ``weights`` (T, S): target subwords down, source subwords across."""
    n_tgt, n_src = weights.shape
    src_pieces, tgt_pieces = list(src_pieces)[:n_src], list(tgt_pieces)[:n_tgt]
    fig = new_figure(figsize=(1.5 + 0.35 * n_src, 1.2 + 0.3 * n_tgt), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(weights.numpy(), cmap="Greys", vmin=0.0, aspect="auto")
    ax.set_xticks(range(len(src_pieces)), src_pieces, rotation=90)
    ax.set_yticks(range(len(tgt_pieces)), tgt_pieces)
    ax.set_xlabel("source subwords")
    ax.set_ylabel("target subwords")
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()
    if title:
        ax.set_title(title, fontsize="small")
    fig.colorbar(image, ax=ax, shrink=0.8)
    path = Path(path)
    with atomic_file(path) as f:
        fig.savefig(f, dpi=120, format=path.suffix.lstrip(".") or "png")
    return path


def attention_picture(
    translator: Translator, sentence: str, path: str | Path, layer: int = -1, head: int = -1
) -> Translation:
    """Translate ``sentence`` with the translator's settings and draw the first model's
    cross-attention for its best hypothesis; returns that hypothesis (with ``.attention``)."""
    best = translator.hypotheses([sentence], attention=True, attention_layer=layer, attention_head=head)[0][0]
    which = f"layer {'mean' if layer == -1 else layer}, head {'mean' if head == -1 else head}"
    plot_attention(
        best.attention,
        translator.tokenizer.src_pieces(sentence),
        best.tokens,
        path,
        f"{shorten(best.text, 60)}  ({which})",
    )
    return best
