"""Docs that cannot rot: the README's tour and the API page's examples run, and the README's
relative links resolve.

A fenced block preceded by the line ``<!-- test -->`` in README.md, docs/getting-started.md or
docs/api.md is run: a ``sh`` block with ``bash -e``, a ``python`` block with the test's
interpreter, in order, in one scratch directory per page. To run in seconds, every
``transformer-train`` line gets the overrides of ``TINY_TRAIN`` appended (later overrides
win), ``experiment=builtin`` becomes ``experiment=tiny``, and the corpus sizes of ``SCALE``
are shrunk; each substitution must find its text, so a page edit that breaks one fails here
instead of running a long job. A renamed key, command or function fails the test.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from serve_live import free_port

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- test -->"
BLOCK = re.compile(re.escape(MARK) + r"\s*\n```(\w+)\n(.*?)\n```", re.S)
TINY_TRAIN = (
    "model=tiny trainer.max_steps=20 trainer.warmup_steps=5 trainer.eval_every=10 trainer.log_every=5"
    " trainer.progress=false trainer.threads=1 trainer.max_minutes=0 data.vocab_size=200 data.max_tokens=512"
    " decode=greedy"
)
SCALE = {"builtin_splits(20000, 500, 500, 1234)": "builtin_splits(300, 20, 20, 1234)"}
LINK = re.compile(r"\]\(([^)\s]+)\)")


def marked_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, code) of every block marked as tested, in page order."""
    return [(lang, code) for lang, code in BLOCK.findall(path.read_text(encoding="utf-8"))]


def scaled(code: str, used: set[str]) -> str:
    """The block as the test runs it: tiny overrides on every transformer-train line, small corpora."""
    code = code.replace("\\\n", " ")  # one command a line
    code = re.sub(r"^(\s*transformer-train\b.*)$", rf"\1 {TINY_TRAIN}", code, flags=re.M)
    for text, small in {**SCALE, "experiment=builtin": "experiment=tiny"}.items():
        if text in code:
            code, _ = code.replace(text, small), used.add(text)
    return code


def run_block(command: list[str], workdir: Path, env: dict[str, str], name: str) -> str:
    """Run one block's command; its output, or a failure that shows the block and its output."""
    log = workdir / f".{name}.log"
    with open(log, "w") as sink:  # a file, not a pipe: a server left in the background must not hold it
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            process.wait(timeout=300)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # whatever the block left running
            except ProcessLookupError:
                pass
    out = log.read_text(encoding="utf-8", errors="replace")
    assert process.returncode == 0, f"{name}: this block failed:\n{command[-1]}\n--- output\n{out[-4000:]}"
    return out


def run_page(path: Path, workdir: Path, expected: set[str]) -> list[str]:
    """Run the page's tested blocks in ``workdir``, shell blocks one by one and consecutive
    Python blocks as one script (so they share names); returns the outputs. Every
    substitution of ``expected`` must have been used by some block."""
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    used: set[str] = set()
    port = str(free_port())
    commands: list[list[str]] = []
    for lang, code in marked_blocks(path):
        code = scaled(code, used).replace("8000", port)
        if lang == "python" and commands and commands[-1][0] == sys.executable:
            commands[-1][-1] += "\n" + code
        else:
            commands.append(["bash", "-e", "-c", code] if lang == "sh" else [sys.executable, "-c", code])
    assert expected <= used, f"{path.name}: the test's substitutions {expected - used} no longer match the page"
    return [run_block(command, workdir, env, f"{path.stem}-{i}") for i, command in enumerate(commands)]


def test_readme_and_getting_started_show_the_same_tour() -> None:
    readme = marked_blocks(ROOT / "README.md")
    assert [lang for lang, _ in readme].count("sh") >= 6, "the tour lost its commands"
    assert marked_blocks(ROOT / "docs" / "getting-started.md") == readme


@pytest.mark.slow
def test_the_readme_tour_runs(tmp_path: Path) -> None:
    outputs = run_page(ROOT / "README.md", tmp_path, set(SCALE))
    run = tmp_path / "runs" / "mine"
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "results.json").is_file()
    assert "BLEU" in "".join(outputs)
    hypotheses = (tmp_path / "hyp.de").read_text(encoding="utf-8").splitlines()
    assert len(hypotheses) == len((tmp_path / "test.en").read_text(encoding="utf-8").splitlines())
    assert all(" ||| " in line for line in hypotheses)  # decode.alignment=true
    assert any('"translations"' in out for out in outputs)  # the server answered
    assert (tmp_path / "export" / "mine" / "config.json").is_file()


@pytest.mark.slow
def test_the_api_page_runs(tmp_path: Path) -> None:
    run_page(ROOT / "docs" / "api.md", tmp_path, {"experiment=builtin"})
    assert (tmp_path / "runs" / "api" / "README.md").is_file()  # write_run_report's run card


def slug(heading: str) -> str:
    """The anchor MkDocs (and GitHub) give a heading."""
    return re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


def test_every_relative_link_of_the_readme_resolves() -> None:
    broken = []
    for target in LINK.findall((ROOT / "README.md").read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://|mailto:|#", target):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path
        if not file.exists():
            broken.append(target)
        elif anchor and anchor not in {slug(h) for h in re.findall(r"^#+ (.*)$", file.read_text(), flags=re.M)}:
            broken.append(target)
    assert not broken, f"README.md links to what is not there: {broken}"


@pytest.mark.slow
def test_version_flag(cli, tmp_path: Path) -> None:
    import transformer

    for command in ("train", "import"):
        done = cli(command, "--version", cwd=tmp_path)
        assert done.returncode == 0 and done.stdout.strip() == f"transformer {transformer.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", transformer.__version__)
