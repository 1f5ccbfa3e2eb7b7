"""Imports only go down the layers: each module of the package may import modules of its own
layer or lower ones, never higher ones (read from the source with ``ast``, lazy imports
inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "transformer"
# lowest first; a module's layer is that of the longest prefix that names it
LAYERS = [
    (
        "transformer.config",
        "transformer.errors",
        "transformer.vocab",
        "transformer.hardware",
        "transformer.rundir",
        "transformer.runtime",
        "transformer.allocator",
    ),
    ("transformer.model", "transformer.data"),
    ("transformer.checkpoint", "transformer.hf_layout", "transformer.import_hf"),
    ("transformer.train", "transformer.decode"),
    (
        "transformer.evaluate",
        "transformer.distill",
        "transformer.shortlist",
        "transformer.report",
        "transformer.sweep",
        "transformer.export",
        "transformer.serve",
        "transformer.plots",
    ),
    ("transformer.cli", "transformer"),
]


def layer_of(module: str) -> int:
    matches = [
        (len(prefix), i)
        for i, names in enumerate(LAYERS)
        for prefix in names
        if module == prefix or module.startswith(prefix + ".")
    ]
    if not matches:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it")
    return max(matches)[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Package modules ``path`` imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # from transformer.train import budget
    return {n for n in names if n == "transformer" or n.startswith("transformer.")}


def is_module(name: str) -> bool:
    target = PACKAGE.parent.joinpath(*name.split("."))
    return target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_go_down(path: Path) -> None:
    me = module_name(path)
    upward = sorted(n for n in imported(path) if is_module(n) and layer_of(n) > layer_of(me))
    assert not upward, f"{me} (layer {layer_of(me)}) imports from higher layers: {upward}"


def test_every_module_has_a_layer() -> None:
    assert len(SOURCES) > 30
    for path in SOURCES:
        layer_of(module_name(path))


def test_an_upward_import_is_caught(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "def f():\n    from transformer.evaluate import evaluate\n    import transformer.cli\n", encoding="utf-8"
    )
    found = {n for n in imported(source) if is_module(n)}
    assert found == {"transformer.evaluate", "transformer.cli"}
    assert all(layer_of(n) > layer_of("transformer.train.loop") for n in found)
