"""transformer-distill: sequence-level knowledge distillation (Kim & Rush 2016) in one command,
and back-translation (Sennrich et al. 2016) with the same machinery.

Stages, each resumable by running the same command again:

1. translate: the teacher (a checkpoint, run directory, imported model, or an ensemble)
   translates the training sources with ``decode`` (beam by default), ``distill.chunk_lines``
   at a time. Each chunk is written atomically and skipped when it is already there, so a
   kill loses at most the chunk being translated; chunks live in the data cache under a key
   of the teacher's files, the search settings and the sources, so another run with the same
   teacher and corpus reuses them. ``distill.translate_minutes`` bounds the stage.
   With ``data.monolingual_tgt`` the reverse model (``data.reverse_model``) back-translates
   that text the same way first.
2. student: transformer-train's recipe on the teacher's pairs (``data.distilled_file``, mixed
   with a share ``data.original_ratio`` of the original ones, and back-translations at
   ``data.bt_ratio``); its own time budget is ``trainer.time_budget_minutes``. A student run
   that was stopped resumes from its last checkpoint.
3. deploy: the student's vocabulary shortlist, built from its training pairs beside its
   checkpoint (``distill.shortlist``; its validation BLEU loss is measured and stored).
4. compare: teacher, student, and the student as deployed (``decode.quantize=distill.quantize``
   with the shortlist) on the test split with the beam and greedily: BLEU, chrF, sentences per
   second and size, in ``distill.json`` and a table in ``distill.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from transformer.checkpoint import CHECKPOINT_DIR, resolve_checkpoint
from transformer.config import DecodeConfig, DistillConfig, DistillSettings, Quantize, TrainConfig, typed
from transformer.data.cache import cache_root
from transformer.data.corpus import file_identity, open_text
from transformer.data.sources import load_train_pairs
from transformer.decode.shortlist import beside
from transformer.decode.translator import Translator
from transformer.errors import UserError
from transformer.evaluate import evaluate, train_and_test
from transformer.report import write_run_report
from transformer.rundir import atomic_write
from transformer.shortlist import ShortlistConfig, run_shortlist

log = logging.getLogger(__name__)
Translate = Callable[[list[str]], list[str]]
CARD, RESULTS = "distill.md", "distill.json"


def fingerprint(*parts: Any) -> str:
    """A short key of JSON-able ``parts`` (file identities, settings, a digest of the sentences)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def text_digest(lines: Sequence[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8") + b"\n")
    return h.hexdigest()


def model_file(path: str) -> Path:
    """The checkpoint a model argument names: a file, or in a run directory the checkpoint
    its test score came from (averaged.pt after trainer.average_last), else best.pt."""
    run = Path(path).expanduser()
    scored = run / CHECKPOINT_DIR / "averaged.pt"
    return scored if run.is_dir() and scored.is_file() else resolve_checkpoint(str(run))


def checkpoint_files(paths: Sequence[str], key: str) -> list[Path]:
    """The checkpoint files of a model argument (``model_file``), checked before any work."""
    files = [model_file(p) for p in paths]
    for given, path in zip(paths, files):
        if not path.is_file():
            raise UserError(
                f"{key}={given}: no checkpoint there (a .pt file or a run directory with {CHECKPOINT_DIR}/best.pt)"
            )
    return files


def write_chunk(path: Path, lines: Sequence[str]) -> None:
    """One chunk of translations, one per line (tabs and newlines inside flattened), atomically."""
    atomic_write(path, "".join(" ".join(line.split()) + "\n" for line in lines))


def read_chunk(path: Path, expected: int) -> list[str]:
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    if len(lines) != expected:
        raise UserError(f"{path}: {len(lines)} lines where {expected} were translated (delete the file to redo it)")
    return lines


def translate_chunks(
    translate: Translate, sentences: Sequence[str], folder: Path, chunk_lines: int, minutes: float = 0
) -> list[str]:
    """``translate`` the sentences ``chunk_lines`` at a time into ``folder/NNNNNN.txt``, skipping
    chunks already there; the translations of the leading chunks done (all of them unless
    ``minutes`` ran out first: the stage stops after the chunk that passes it)."""
    if chunk_lines < 1:
        raise UserError(f"distill.chunk_lines={chunk_lines} must be >= 1")
    folder.mkdir(parents=True, exist_ok=True)
    start, done = time.monotonic(), []
    for k, first in enumerate(range(0, len(sentences), chunk_lines)):
        lines, path = list(sentences[first : first + chunk_lines]), folder / f"{k:06d}.txt"
        if not path.exists():
            if minutes and time.monotonic() - start >= minutes * 60:
                log.warning(
                    "distill.translate_minutes=%g reached: %d of %d sentences translated",
                    minutes,
                    first,
                    len(sentences),
                )
                break
            write_chunk(path, translate(lines))
            log.info("translated %d of %d sentences", first + len(lines), len(sentences))
        done += read_chunk(path, len(lines))
    return done


def write_pairs(sources: Sequence[str], targets: Sequence[str], path: Path) -> Path:
    """Synthetic pairs as the TSV data.distilled_file and data.bt_file read, atomically."""
    atomic_write(path, "".join(f"{' '.join(s.split())}\t{' '.join(t.split())}\n" for s, t in zip(sources, targets)))
    return path


def translator_of(paths: Sequence[str], key: str, decode: DecodeConfig, device: str) -> tuple[Translator, list[Path]]:
    files = checkpoint_files(paths, key)
    return Translator.from_checkpoint(files[0], device=device, ensemble=files[1:], config=decode), files


def translated_pairs(
    what: str,
    models: Sequence[str],
    key: str,
    sentences: list[str],
    cfg: TrainConfig,
    chunks: DistillSettings,
    cache: Path,
) -> tuple[list[str], Path]:
    """``sentences`` translated by ``models`` (the teacher or the reverse model) with
    ``cfg.decode`` in cached, resumable chunks; the translations done and the cache folder of
    this model, search and text."""
    files = checkpoint_files(models, key)
    settings = {k: v for k, v in asdict(cfg.decode).items() if k not in ("batch_tokens", "prepack")}
    key_parts = ([file_identity(str(f)) for f in files], settings, text_digest(sentences))
    folder = cache / "synthetic" / f"{what}-{fingerprint(*key_parts)}"
    log.info("%s: %d sentences with %s (chunks in %s)", what, len(sentences), ", ".join(map(str, files)), folder)
    translator: list[Translator] = []  # loaded only when a chunk is missing

    def translate(lines: list[str]) -> list[str]:
        if not translator:
            translator.append(translator_of(models, key, cfg.decode, cfg.trainer.device)[0])
        return translator[0].translate(lines)

    done = translate_chunks(translate, sentences, folder / "chunks", chunks.chunk_lines, chunks.translate_minutes)
    return done, folder


def back_translated(cfg: TrainConfig, chunks: DistillSettings | None = None, cache: Path | None = None) -> TrainConfig:
    """The config with ``data.bt_file`` set: data.monolingual_tgt back-translated by
    data.reverse_model (transformer-train and transformer-distill call this first), chunks
    cached in ``cache`` (the data cache beside the run by default)."""
    d = cfg.data
    if not d.monolingual_tgt:
        return cfg
    if not d.reverse_model:
        raise UserError(
            f"data.monolingual_tgt={d.monolingual_tgt} needs data.reverse_model=RUN_OR_PT: a model translating "
            f"{d.tgt_lang} -> {d.src_lang} (train one on the corpus reversed: a data.corpora entry with reverse: true)"
        )
    try:
        targets = [line.strip() for _, line in open_text(d.monolingual_tgt) if line.strip()]
    except FileNotFoundError:
        raise UserError(f"data.monolingual_tgt={d.monolingual_tgt}: no such file") from None
    chunks = replace(chunks or DistillSettings(), translate_minutes=0.0)  # the budget is the teacher's stage's
    sources, folder = translated_pairs(
        "bt", [d.reverse_model], "data.reverse_model", targets, cfg, chunks, cache or cache_root(d, Path(cfg.run_dir))
    )
    return replace(cfg, data=replace(d, bt_file=str(write_pairs(sources, targets, folder / "pairs.tsv"))))


def distilled(cfg: DistillConfig, student: TrainConfig, cache: Path) -> TrainConfig:
    """The student's config with ``data.distilled_file`` set: the training sources with the
    teacher's translations (those done, should distill.translate_minutes run out)."""
    sources = [s for s, _ in load_train_pairs(cfg.data)]
    targets, folder = translated_pairs(
        "distill", [cfg.teacher, *cfg.ensemble], "teacher", sources, cfg, cfg.distill, cache
    )
    name = "pairs.tsv" if len(targets) == len(sources) else "pairs.partial.tsv"
    path = write_pairs(sources, targets, folder / name)
    return replace(student, data=replace(student.data, distilled_file=str(path)))


def student_config(cfg: DistillConfig) -> TrainConfig:
    """transformer-train's config for the student, in ``<run>/student``, resumed if it was stopped."""
    keys = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig)}
    run = Path(cfg.run_dir) / "student"
    resume = str(run) if (run / CHECKPOINT_DIR / "last.pt").is_file() else cfg.trainer.resume
    return TrainConfig(**keys | {"run_dir": str(run), "trainer": replace(cfg.trainer, resume=resume)})


def model_size(translator: Translator) -> dict:
    n = sum(p.numel() for m in translator.models for p in m.parameters())
    return {"parameters": n, "fp32_mb": round(n * 4 / 2**20, 2)}


def scored_searches(name: str, paths: Sequence[str], key: str, cfg: DistillConfig, decode: DecodeConfig) -> dict:
    """One model (or ensemble) on the test split with the beam and greedily: scores and speed
    (one translator: the checkpoints read, and packed or quantised, once for both and before
    the clock starts)."""
    translator, files = translator_of(paths, key, decode, cfg.trainer.device)
    translator.search_models(decode)
    row: dict[str, Any] = {"checkpoints": [str(p) for p in files], **model_size(translator)}
    for search, beam in (("beam", decode.beam_size), ("greedy", 1)):
        translator.config = replace(decode, beam_size=beam, n_best=1)
        start = time.perf_counter()
        out = Path(cfg.run_dir) / f"{name.replace(' ', '-')}.{search}.hyp.txt"
        result = evaluate(
            str(files[0]), data=cfg.data, decode=translator.config, output=str(out), translator=translator
        )
        seconds = time.perf_counter() - start
        row[search] = {
            "beam_size": beam,
            "bleu": result["bleu"],
            "chrf": result["chrf"],
            "sentences_per_s": round(result["sentences"] / seconds, 2),
            "bleu_signature": result["bleu_signature"],
        }
    return row


def deployed(cfg: DistillConfig, student: Path) -> tuple[str, DecodeConfig] | None:
    """The student as deployed: its row's name and decode settings (distill.quantize, and the
    shortlist, built beside the checkpoint unless one is there); None when neither is asked for."""
    settings = cfg.distill
    if settings.quantize == Quantize.none and not settings.shortlist:
        return None
    decode = replace(cfg.decode, quantize=settings.quantize)
    forms = [] if settings.quantize == Quantize.none else [str(settings.quantize)]
    if settings.shortlist:
        table = beside(student)
        if not table.is_file():
            run_shortlist(ShortlistConfig(checkpoint=str(student), output=str(table)))
        decode, forms = replace(decode, shortlist=str(table)), [*forms, "shortlist"]
    return "student " + "+".join(forms), decode


def compare(cfg: DistillConfig, student: Path) -> dict:
    """Teacher, student and the student as deployed side by side; the speed-up over the teacher's beam."""
    teacher = [cfg.teacher, *cfg.ensemble]
    rows = {
        "teacher": scored_searches("teacher", teacher, "teacher", cfg, cfg.decode),
        "student": scored_searches("student", [str(student)], "student", cfg, cfg.decode),
    }
    if deploy := deployed(cfg, student):
        rows[deploy[0]] = scored_searches(deploy[0], [str(student)], "student", cfg, deploy[1])
    teacher_beam = rows["teacher"]["beam"]["sentences_per_s"]
    for row in list(rows.values())[1:]:  # the students
        for search in ("beam", "greedy"):
            row[search]["speedup"] = round(row[search]["sentences_per_s"] / teacher_beam, 2)
    return rows


def card(rows: dict, cfg: DistillConfig) -> str:
    """distill.md: the comparison as a Markdown table."""
    lines = [
        "# Distillation: teacher and student",
        "",
        f"Test split of `{cfg.data.name}`, {cfg.decode.beam_size}-beam and greedy search, sentences per second on "
        f"this machine (the student's speed-up is over the teacher's beam).",
        "",
        "| model | parameters | search | BLEU | chrF2 | sentences/s | speed-up |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        for search in ("beam", "greedy"):
            r = row[search]
            speedup = f"{r['speedup']:.2f}x" if "speedup" in r else ""
            lines.append(
                f"| {name} | {row['parameters']:,} | {search} {r['beam_size']} | {r['bleu']:.2f} | {r['chrf']:.2f} "
                f"| {r['sentences_per_s']:.1f} | {speedup} |"
            )
    return "\n".join([*lines, "", f"BLEU signature `{rows['student']['beam']['bleu_signature']}`", ""])


def distill(cfg: DistillConfig | Any) -> dict:
    """The three stages (module docstring); returns the student's metrics with the comparison."""
    cfg = typed(cfg, DistillConfig)
    if not cfg.run_dir:
        raise UserError("run_dir must be set (the CLI sets it to Hydra's output directory)")
    run, cache = Path(cfg.run_dir), cache_root(cfg.data, Path(cfg.run_dir))
    checkpoint_files([cfg.teacher, *cfg.ensemble], "teacher")  # a wrong path fails before any work
    student = distilled(cfg, back_translated(student_config(cfg), cfg.distill, cache), cache)
    metrics = train_and_test(student)
    write_run_report(metrics["run_dir"], student, metrics)
    final = metrics.get("test", {}).get("checkpoint") or resolve_checkpoint(metrics["run_dir"])
    if cfg.distill.compare:
        rows = compare(cfg, Path(final))
        metrics["distill"] = rows
        atomic_write(run / RESULTS, json.dumps(rows, indent=2) + "\n")
        atomic_write(run / CARD, card(rows, cfg))
    return metrics
