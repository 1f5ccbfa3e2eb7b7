"""``transformer-import``: a Hugging Face model directory as our checkpoint
(the work: import_hf.py)."""

from __future__ import annotations

from collections.abc import Sequence

from transformer.cli import run_plain_command
from transformer.import_hf import USAGE, ImportConfig, run_import


def main(argv: Sequence[str] | None = None) -> None:
    run_plain_command(ImportConfig, argv, USAGE, run_import)


if __name__ == "__main__":
    main()
