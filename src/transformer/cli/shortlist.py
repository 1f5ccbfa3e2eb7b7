"""``transformer-shortlist``: a checkpoint's vocabulary shortlist, measured and stored beside it
(the work: shortlist.py)."""

from __future__ import annotations

from collections.abc import Sequence

from transformer.cli import run_plain_command
from transformer.shortlist import USAGE, ShortlistConfig, run_shortlist


def main(argv: Sequence[str] | None = None) -> None:
    run_plain_command(ShortlistConfig, argv, USAGE, run_shortlist)


if __name__ == "__main__":
    main()
