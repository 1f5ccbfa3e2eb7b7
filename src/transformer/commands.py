"""Command plumbing below the console entry points: ``key=value`` arguments checked against
a dataclass, one ``error:`` line for a mistake, and the logging of commands whose stdout
carries results. Bottom layer, so any command module (export, average, import) can use it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import OmegaConf

from transformer.errors import UserError, first_line


def print_version(argv: list[str]) -> bool:
    """``--version`` as the first argument of any command: print the package version (True)."""
    if argv[:1] != ["--version"]:
        return False
    from importlib.metadata import version

    print(f"transformer {version('transformer')}")
    return True


def run_plain_command(
    schema: type, argv: list[str], usage: str, task: Callable[[Any], None], listed: tuple[str, ...] = ()
) -> None:
    """A command without config groups (export, average): ``key=value`` arguments checked
    against the dataclass ``schema`` (keys in ``listed`` also take a single value), then
    ``task(config)``; UserErrors print one line and exit with 2."""
    from omegaconf.errors import OmegaConfBaseException

    if print_version(argv):
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return
    quiet_logging()
    try:
        try:
            given = OmegaConf.from_cli(argv)
            for key in listed:
                if isinstance(given.get(key), str):
                    given[key] = [given[key]]
            cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), given))
        except OmegaConfBaseException as e:
            key = f"{e.full_key}: " if getattr(e, "full_key", None) else ""  # an enum's error names it below
            raise UserError(f"{key}{first_line(e)} (usage: {usage.splitlines()[0].removeprefix('usage: ')})") from None
        task(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def quiet_logging() -> None:
    """decode/evaluate: INFO to stderr, so stdout carries only translations or scores."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
