"""The console scripts end to end, as a user runs them: installed entry points started
from a directory outside the repository, one tiny run trained and then reused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# distinct subword lengths, so batches are built the same whatever the input order
LINES = [
    "twenty-one",
    "",
    "I have three red apples.",
    " ".join(["We see seventy-seven red cars."] * 30),
    "the nineteen small dogs",
]
OVER_LONG_LINE = 4  # 1-based: longer than the tiny model's max_positions


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("outside_repo")


@pytest.fixture(scope="module")
def cli_run(cli, workdir: Path) -> Path:
    run = workdir / "runs" / "tiny"
    result = cli("train", "experiment=tiny", f"run_dir={run}", f"hydra.run.dir={run}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.mark.slow
def test_train_writes_a_checkpoint(cli_run: Path) -> None:
    assert (cli_run / "checkpoints" / "best.pt").is_file()
    assert (cli_run / "checkpoints" / "last.pt").is_file()
    assert (cli_run / "metrics.jsonl").is_file() and (cli_run / "results.json").is_file()
    assert not list(cli_run.glob("checkpoints/.*.tmp"))


@pytest.mark.slow
def test_evaluate_prints_scores_and_writes_hypotheses(cli, cli_run: Path, workdir: Path) -> None:
    result = cli(
        "evaluate",
        f"checkpoint={cli_run}",
        "data=builtin",
        "data.builtin_train=200",
        "data.builtin_valid=20",
        "data.builtin_test=20",
        "decode=greedy",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^BLEU = \d+\.\d+", result.stdout, re.M)
    assert re.search(r"^chrF2 = \d+\.\d+", result.stdout, re.M)
    hyp_file = Path(re.search(r"^hypotheses: (.+)$", result.stdout, re.M).group(1))
    assert hyp_file.is_file() and len(hyp_file.read_text(encoding="utf-8").splitlines()) == 20
    assert hyp_file.with_suffix(".json").is_file()


@pytest.mark.slow
def test_evaluate_an_ensemble(cli, cli_run: Path, workdir: Path) -> None:
    """The model ensembled with itself scores as the model alone (same probabilities)."""
    args = [
        f"checkpoint={cli_run}",
        "data=builtin",
        "data.builtin_train=200",
        "data.builtin_valid=20",
        "data.builtin_test=20",
        "decode=greedy",
    ]
    alone = cli("evaluate", *args, f"output={workdir / 'alone.txt'}", cwd=workdir)
    pair = cli(
        "evaluate",
        *args,
        f"ensemble=[{cli_run / 'checkpoints/best.pt'}]",
        f"output={workdir / 'pair.txt'}",
        cwd=workdir,
    )
    assert alone.returncode == 0 and pair.returncode == 0, pair.stderr[-3000:]
    assert (workdir / "pair.txt").read_text(encoding="utf-8") == (workdir / "alone.txt").read_text(encoding="utf-8")
    assert json.loads((workdir / "pair.json").read_text(encoding="utf-8"))["ensemble"] == [
        str(cli_run / "checkpoints/best.pt")
    ]


def test_decode_one_sentence(cli, cli_run: Path, workdir: Path) -> None:
    result = cli("decode", f"checkpoint={cli_run}", "sentence=twenty-one", "decode=greedy", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("\n") == 1 and result.stdout.endswith("\n")


@pytest.fixture(scope="module")
def decoded_file(cli, cli_run: Path, workdir: Path) -> tuple[list[str], str]:
    """Translations of LINES read from a file (stdout lines) and the stderr of that run."""
    source = workdir / "input.en"
    source.write_text("".join(line + "\n" for line in LINES), encoding="utf-8")
    result = cli("decode", f"checkpoint={cli_run}", f"input={source}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split("\n")[:-1], result.stderr


@pytest.mark.slow
def test_decode_from_a_file_keeps_one_line_per_input(decoded_file: tuple[list[str], str]) -> None:
    outputs, stderr = decoded_file
    assert len(outputs) == len(LINES)
    assert outputs[OVER_LONG_LINE - 1].strip()  # cut with a warning, still translated
    assert re.search(rf"input line {OVER_LONG_LINE} has \d+ subwords, more than model.max_positions=128", stderr)


@pytest.mark.slow
def test_decode_from_stdin_keeps_order_and_prints_scores(
    cli, cli_run: Path, workdir: Path, decoded_file: tuple[list[str], str]
) -> None:
    outputs, _ = decoded_file
    stdin = "".join(line + "\n" for line in reversed(LINES))
    result = cli("decode", f"checkpoint={cli_run}", "scores=true", cwd=workdir, input=stdin)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = result.stdout.split("\n")[:-1]
    assert len(rows) == len(LINES)
    for row in rows:
        assert re.fullmatch(r"-?\d+\.\d{4}\t.*", row), row
    assert [row.split("\t", 1)[1] for row in rows] == list(reversed(outputs))


@pytest.mark.slow
def test_decode_n_best(cli, cli_run: Path, workdir: Path) -> None:
    stdin = "twenty-one\nthe nineteen small dogs\n"
    result = cli("decode", f"checkpoint={cli_run}", "decode=beam", "decode.n_best=3", cwd=workdir, input=stdin)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [re.fullmatch(r"(\d+) \|\|\| (.*) \|\|\| (-?\d+\.\d{4})", row) for row in result.stdout.splitlines()]
    assert all(rows), result.stdout
    assert [int(m.group(1)) for m in rows] == [0, 0, 0, 1, 1, 1]
    for i in (0, 1):
        scores = [float(m.group(3)) for m in rows if int(m.group(1)) == i]
        assert scores == sorted(scores, reverse=True)
