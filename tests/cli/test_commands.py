"""Every console command (pyproject.toml's [project.scripts], as installed) lives in the ``transformer.cli`` package, one module
each, and answers ``--version`` and ``--help`` (called in this process: tests/cli/test_cli.py runs
the installed scripts end to end)."""

from __future__ import annotations

import importlib
import logging
import sys
from importlib.metadata import distribution

import pytest

import transformer

SCRIPTS = {e.name: e.value for e in distribution("transformer").entry_points if e.group == "console_scripts"}


def entry_point(target: str):
    module, _, name = target.partition(":")
    return importlib.import_module(module), name


def test_every_command_is_a_main_in_the_cli_package() -> None:
    assert len(SCRIPTS) >= 9
    modules = set()
    for command, target in SCRIPTS.items():
        module, name = entry_point(target)
        assert module.__name__.startswith("transformer.cli.") and name == "main", command
        assert callable(module.main)
        modules.add(module.__name__)
    assert len(modules) == len(SCRIPTS)  # one module per command


@pytest.fixture
def command_line(monkeypatch: pytest.MonkeyPatch):
    """Run a command's ``main`` with ``args`` as its command line; (exit status, stdout)."""
    monkeypatch.setenv("TRANSFORMER_ALLOCATOR", "system")  # no re-execution of the test process under mimalloc

    def run(command: str, *args: str, capsys: pytest.CaptureFixture) -> tuple[int, str]:
        module, _ = entry_point(SCRIPTS[command])
        monkeypatch.setattr(sys, "argv", [command, *args])
        try:
            module.main()
            status = 0
        except SystemExit as e:
            status = e.code or 0
        return status, capsys.readouterr().out

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield run
    root.handlers[:], root.level = handlers, level  # a command's logging setup holds the captured stderr


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_version(command: str, command_line, capsys: pytest.CaptureFixture) -> None:
    assert command_line(command, "--version", capsys=capsys) == (0, f"transformer {transformer.__version__}\n")


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_help(command: str, command_line, capsys: pytest.CaptureFixture) -> None:
    status, out = command_line(command, "--help", capsys=capsys)
    assert status == 0
    assert out.startswith(f"usage: {command} ") or out.startswith(f"{command}:") or "== Config" in out, (
        out
    )  # key=value usage, or Hydra's groups
