"""``transformer-export``: write a checkpoint as a Hugging Face model directory (and a CTranslate2 model)
(the work: export.py)."""

from __future__ import annotations

from collections.abc import Sequence

from transformer.cli import run_plain_command
from transformer.export import USAGE, ExportConfig, run_export


def main(argv: Sequence[str] | None = None) -> None:
    run_plain_command(ExportConfig, argv, USAGE, run_export)


if __name__ == "__main__":
    main()
