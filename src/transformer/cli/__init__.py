"""The console commands, the package's top layer: one module per command, holding only its
``main`` (arguments in, the library function called, results printed); the work stays in the
library (``transformer.evaluate``, ``transformer.export``, ...).

=====================  =========================  ============================================
command                entry point                library
=====================  =========================  ============================================
transformer-train      cli/train.py               evaluate.train_and_test
transformer-evaluate   cli/evaluate.py            evaluate.evaluate
transformer-decode     cli/decode.py              decode.translator.Translator
transformer-serve      cli/serve.py               serve.server.serve
transformer-distill    cli/distill.py             distill.distill
transformer-export     cli/export.py              export.run_export
transformer-import     cli/import_hf.py           import_hf.run_import
transformer-average    cli/average.py             train.average.average
transformer-shortlist  cli/shortlist.py           shortlist.run_shortlist
=====================  =========================  ============================================

This module is what they share: Hydra commands (config groups) and plain ``key=value``
commands checked against a dataclass, ``--version``, and mistakes a user can fix
(``UserError``) printed as one line, ``error: ...``, with exit status 2. Hydra names a run's
log file after the module that defines the task (``cli.log``), so ``hydra_entry`` lives here.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from transformer.config import DecodeConfig, config_dir, missing_keys, register_configs
from transformer.errors import UserError, first_line


def print_version(argv: Sequence[str]) -> bool:
    """``--version`` as the first argument of any command: print the package version (True)."""
    if list(argv[:1]) != ["--version"]:
        return False
    from importlib.metadata import version

    print(f"transformer {version('transformer')}")
    return True


def hydra_entry(config_name: str, task: Callable[[DictConfig], Any]) -> None:
    """Run ``task`` under Hydra with the packaged configs, turning UserErrors into one line."""
    if print_version(sys.argv[1:]):
        return
    register_configs()

    def guarded(cfg: DictConfig) -> Any:
        try:
            if missing := missing_keys(cfg):  # e.g. transformer-decode without checkpoint=
                raise UserError(f"{', '.join(missing)} must be given ({missing[0]}=...; see --help)")
            return task(cfg)
        except UserError as e:
            logging.getLogger("transformer").debug("user error", exc_info=True)
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(guarded)()


def run_plain_command(
    schema: type, argv: Sequence[str] | None, usage: str, task: Callable[[Any], None], listed: tuple[str, ...] = ()
) -> None:
    """A command without config groups (export, average, ...): ``key=value`` arguments (``argv``,
    or the command line's when None) checked against the dataclass ``schema`` (keys in
    ``listed`` also take a single value), then ``task(config)``; UserErrors print one line and
    exit with 2."""
    from omegaconf.errors import OmegaConfBaseException

    argv = sys.argv[1:] if argv is None else list(argv)
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


def decode_config(cfg: DictConfig) -> DecodeConfig:
    """The ``decode`` group of a composed config as the dataclass the Translator takes."""
    return DecodeConfig(**OmegaConf.to_container(cfg.decode, resolve=True))
