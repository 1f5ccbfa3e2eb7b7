"""Parallel corpora as lists of (source, target) strings, from three places:

- ``builtin``: English number phrases -> German, generated offline (``data/builtin.py``);
- ``files``: local plain-text pairs (optionally .gz), a TSV, or JSON lines;
- ``hub``: a Hugging Face ``datasets`` dataset by name (or a local dataset directory).

Every reading error names the file and line. Pairs with an empty side are skipped and counted.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Optional

from transformer.config import CHOICES, DataConfig, choice
from transformer.errors import UserError, first_line

log = logging.getLogger(__name__)

Pair = tuple[str, str]
SPLITS = ("train", "valid", "test")


def open_text(path: str) -> Iterator[tuple[int, str]]:
    """(line number, line without newline) of a UTF-8 text file (a leading byte-order mark is
    dropped), gzipped when it ends in .gz."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{path}: file not found")
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")  # drop a BOM
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise UserError(f"{path}: file not found") from None
        raise UserError(f"{path}: cannot read ({e})") from None


def read_text_pair(src_path: str, tgt_path: str) -> list[Pair]:
    """Two files, one sentence a line, aligned by line number."""
    src = [line for _, line in open_text(src_path)]
    tgt = [line for _, line in open_text(tgt_path)]
    if len(src) != len(tgt):
        raise UserError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: parallel files must align line by line")
    return list(zip(src, tgt))


def read_tsv(path: str) -> list[Pair]:
    pairs = []
    for number, line in open_text(path):
        fields = line.split("\t")
        if len(fields) != 2:
            raise UserError(f"{path}:{number}: expected 2 tab-separated fields (source<TAB>target), found {len(fields)}")
        pairs.append((fields[0], fields[1]))
    return pairs


def pair_from_record(record: dict, cfg: DataConfig, where: str) -> Pair:
    """(source, target) of one dataset record: a ``translation`` dict or two flat columns."""
    if cfg.translation_field:
        row = record.get(cfg.translation_field)
        keys = (cfg.src_lang, cfg.tgt_lang)
        if not isinstance(row, dict) or any(k not in row for k in keys):
            raise UserError(f"{where}: expected field {cfg.translation_field!r} holding keys {keys} (data.translation_field, data.src_lang, data.tgt_lang)")
        src, tgt = row[cfg.src_lang], row[cfg.tgt_lang]
    else:
        if cfg.src_field not in record or cfg.tgt_field not in record:
            raise UserError(f"{where}: expected fields {cfg.src_field!r} and {cfg.tgt_field!r} (data.src_field, data.tgt_field); found {sorted(record)}")
        src, tgt = record[cfg.src_field], record[cfg.tgt_field]
    return str(src or ""), str(tgt or "")


def read_jsonl(path: str, cfg: DataConfig) -> list[Pair]:
    pairs = []
    for number, line in open_text(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        pairs.append(pair_from_record(record, cfg, f"{path}:{number}"))
    return pairs


def load_hub(cfg: DataConfig, split_name: str, streaming: bool) -> Any:
    """``datasets.load_dataset`` for a hub name or a local dataset directory, with a one-line
    error naming the dataset and split."""
    import datasets

    try:
        return datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=split_name, streaming=streaming)
    except Exception as e:  # datasets raises many types; the user needs the name and the reason
        raise UserError(f"data.hub_name={cfg.hub_name!r} split {split_name!r}: cannot load ({first_line(e)})") from None


def read_hub(cfg: DataConfig, split: str) -> list[Pair]:
    """A split of a Hugging Face dataset (a hub name, or a local dataset directory)."""
    split_name = {"train": cfg.train_split, "valid": cfg.valid_split, "test": cfg.test_split}[split]
    ds = load_hub(cfg, split_name, cfg.streaming)
    where = f"{cfg.hub_name}[{split_name}]"
    return [pair_from_record(r, cfg, f"{where} row {i}") for i, r in enumerate(ds)]


def read_split(cfg: DataConfig, split: str) -> list[Pair]:
    """Raw pairs of one split, as stored."""
    if cfg.source == "builtin":
        from transformer.data.builtin import builtin_splits

        return builtin_splits(cfg.builtin_train, cfg.builtin_valid, cfg.builtin_test, cfg.builtin_seed)[split]
    if cfg.source == "hub":
        if not cfg.hub_name:
            raise UserError("data.hub_name is required when data.source=hub")
        return read_hub(cfg, split)
    if choice("data", "source", cfg.source) != "files":
        raise UserError(f"data.source={cfg.source!r}: expected one of builtin, files, hub")
    if cfg.format == "text":
        src, tgt = getattr(cfg, f"{split}_src"), getattr(cfg, f"{split}_tgt")
        if not src or not tgt:
            raise UserError(f"data.{split}_src and data.{split}_tgt must be set for data.format=text")
        return read_text_pair(src, tgt)
    path = getattr(cfg, f"{split}_file")
    if not path:
        raise UserError(f"data.{split}_file must be set for data.format={cfg.format}")
    if cfg.format == "tsv":
        return read_tsv(path)
    if cfg.format == "jsonl":
        return read_jsonl(path, cfg)
    raise UserError(f"data.format={cfg.format!r}: expected one of {', '.join(CHOICES['data']['format'])}")


def clean_pairs(pairs: list[Pair], name: str) -> list[Pair]:
    """Strip whitespace, skip pairs with an empty side (counted), fail on an empty corpus."""
    kept = [(s.strip(), t.strip()) for s, t in pairs]
    kept = [(s, t) for s, t in kept if s and t]
    if len(kept) < len(pairs):
        log.warning("%s: skipped %d pairs with an empty side", name, len(pairs) - len(kept))
    if not kept:
        raise UserError(f"{name}: no sentence pairs (the corpus is empty or every line is blank)")
    return kept


def load_split(cfg: DataConfig, split: str) -> list[Pair]:
    """Clean pairs of ``split`` (train, valid or test)."""
    if split not in SPLITS:
        raise UserError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    return clean_pairs(read_split(cfg, split), f"{cfg.name} {split}")


def load_files(src_path: str, ref_path: Optional[str]) -> tuple[list[str], Optional[list[str]]]:
    """Source lines (and references) for scoring or decoding given files; blank source lines
    are kept so the output stays aligned with the input."""
    src = [line.strip() for _, line in open_text(src_path)]
    if ref_path is None:
        return src, None
    ref = [line.strip() for _, line in open_text(ref_path)]
    if len(src) != len(ref):
        raise UserError(f"{src_path} has {len(src)} lines but {ref_path} has {len(ref)}: they must align line by line")
    return src, ref
