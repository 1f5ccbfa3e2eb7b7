"""``transformer-average``: one checkpoint whose weights are the mean of several (the work:
train/average.py)."""

from __future__ import annotations

from collections.abc import Sequence

from transformer.cli import run_plain_command
from transformer.train.average import USAGE, AverageConfig, average


def main(argv: Sequence[str] | None = None) -> None:
    run_plain_command(AverageConfig, argv, USAGE, average, listed=("inputs",))


if __name__ == "__main__":
    main()
