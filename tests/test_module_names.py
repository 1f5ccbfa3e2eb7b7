"""No name a package binds shadows one of its modules: ``transformer.train`` is the module
``transformer/train/`` whatever the order of the imports before it (a package attribute set
by ``__init__`` would hide the submodule from ``import transformer.train`` once loaded)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "transformer"
PACKAGES = sorted(PACKAGE.rglob("__init__.py"))


def bound_names(init: Path) -> set[str]:
    """Names an ``__init__.py`` binds at its top level (imports, assignments, definitions)."""
    names: set[str] = set()
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def submodules(init: Path) -> set[str]:
    folder = init.parent
    return {p.stem for p in folder.glob("*.py") if p.stem != "__init__"} | {
        p.parent.name for p in folder.glob("*/__init__.py")
    }


@pytest.mark.parametrize("init", PACKAGES, ids=lambda p: str(p.parent.relative_to(PACKAGE.parent)))
def test_no_package_name_shadows_a_module(init: Path) -> None:
    assert not bound_names(init) & submodules(init)


def test_a_shadowing_name_is_caught(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "train.py").write_text("")
    (tmp_path / "pkg" / "decode").mkdir()
    (tmp_path / "pkg" / "decode" / "__init__.py").write_text("")
    init = tmp_path / "pkg" / "__init__.py"
    init.write_text("from pkg.evaluate import train_and_test as train\nfrom pkg import decode\nx = 1\n")
    assert bound_names(init) & submodules(init) == {"train", "decode"}


ORDERS = [  # the package first; a submodule first (its package runs first); a deep module, then the package
    "from transformer import Translator",
    "from transformer.evaluate import evaluate, train_and_test",
    "import transformer.train.loop\nimport transformer",
]


@pytest.mark.slow
def test_train_and_evaluate_are_the_modules_whatever_the_import_order() -> None:
    check = (
        "\nimport types, transformer.train, transformer.evaluate\n"
        "for name in ('train', 'evaluate'):\n"
        "    attr = getattr(transformer, name)\n"
        "    assert isinstance(attr, types.ModuleType) and attr.__name__ == 'transformer.' + name, (name, attr)\n"
    )
    for first in ORDERS:  # each order in a fresh interpreter: only the first import of a module counts
        done = subprocess.run([sys.executable, "-c", first + check], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (first, done.stderr[-2000:])


def test_the_package_and_the_commands_import_no_torch() -> None:
    """A console command re-executes itself under mimalloc (allocator.use_fast_allocator) after
    importing its module: that must not cost an ``import torch`` (~3.5 s on 2 cores) twice."""
    commands = ", ".join(f"transformer.cli.{c}" for c in ("train", "decode", "evaluate", "serve", "distill"))
    code = f"import sys, transformer, {commands}; print(sorted(m for m in ('torch', 'transformer.decode') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    code = "from transformer import Translator; print(Translator.__module__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "transformer.decode.translator"
