"""``transformer-serve``: ``key=value`` settings (serve/settings.py) checked, then the HTTP
server (serve/server.py) until SIGTERM."""

from __future__ import annotations

from collections.abc import Sequence

from transformer.allocator import use_fast_allocator
from transformer.cli import run_plain_command


def run(argv: Sequence[str] | None = None) -> None:
    """The command in this process as it is (called from Python, it never re-executes itself)."""
    from transformer.serve.server import serve
    from transformer.serve.settings import USAGE, ServeRunConfig

    run_plain_command(ServeRunConfig, argv, USAGE, serve)


def main() -> None:
    """The transformer-serve command: ``run`` under mimalloc (see cli/train.py)."""
    use_fast_allocator()
    run()


if __name__ == "__main__":
    main()
