"""Parallel corpora as lists of (source, target) strings, from three places:

- ``builtin``: English number phrases -> German, generated offline (``data/builtin.py``);
- ``files``: local plain-text pairs (optionally .gz), a TSV, or JSON lines;
- ``hub``: a Hugging Face ``datasets`` dataset by name (or a local dataset directory).

Every reading error names the file and line. Pairs with an empty side are skipped and counted.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from hashlib import blake2b
from pathlib import Path
from typing import Any

import numpy as np

from transformer.config import DataConfig, DataFormat
from transformer.errors import UserError, first_line

log = logging.getLogger(__name__)

Pair = tuple[str, str]
SPLITS = ("train", "valid", "test")


def open_text(path: str) -> Iterator[tuple[int, str]]:
    """(line number, line without newline) of a UTF-8 text file (a leading byte-order mark is
    dropped), gzipped when it ends in .gz."""
    for first, lines in text_blocks(path):
        yield from zip(itertools.count(first), lines)


def text_blocks(path: str, block_bytes: int = 1 << 22) -> Iterator[tuple[int, list[str]]]:
    """(number of the first line, lines) of a text file, a few MiB at a time: decoded and
    split a block at once, which is several times faster than line by line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{path}: file not found")
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as f:
            first = 1
            while raw := f.readlines(block_bytes):
                lines = decode_lines(raw, path, first)
                yield first, lines
                first += len(lines)
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise UserError(f"{path}: file not found") from None
        raise UserError(f"{path}: cannot read ({e})") from None


def decode_lines(raw: list[bytes], path: str, first: int) -> list[str]:
    """Raw lines (each ending in a newline but perhaps the last) as text without line ends."""
    try:
        text = b"".join(raw).decode("utf-8-sig" if first == 1 else "utf-8")  # drop a BOM
    except UnicodeDecodeError:
        for number, line in enumerate(raw, start=first):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        raise
    lines = text.split("\n")
    if raw[-1].endswith(b"\n"):
        lines.pop()  # the empty string after the block's last newline
    return [line.rstrip("\r") for line in lines] if "\r" in text else lines


def read_text_pair(src_path: str, tgt_path: str) -> Iterator[Pair]:
    """Two files, one sentence a line, aligned by line number (read in step, so a corpus
    larger than memory streams)."""
    counts = [0, 0]
    for s, t in itertools.zip_longest(open_text(src_path), open_text(tgt_path)):
        counts[0] += s is not None
        counts[1] += t is not None
        if s is not None and t is not None:
            yield s[1], t[1]
    if counts[0] != counts[1]:
        raise UserError(
            f"{src_path} has {counts[0]} lines but {tgt_path} has {counts[1]}: parallel files must align line by line"
        )


def read_tsv(path: str) -> Iterator[Pair]:
    for number, line in open_text(path):
        fields = line.split("\t")
        if len(fields) != 2:
            raise UserError(
                f"{path}:{number}: expected 2 tab-separated fields (source<TAB>target), found {len(fields)}"
            )
        yield fields[0], fields[1]


def pair_from_record(record: dict, cfg: DataConfig, where: str) -> Pair:
    """(source, target) of one dataset record: a ``translation`` dict or two flat columns."""
    if cfg.translation_field:
        row = record.get(cfg.translation_field)
        keys = (cfg.src_lang, cfg.tgt_lang)
        if not isinstance(row, dict) or any(k not in row for k in keys):
            raise UserError(
                f"{where}: expected field {cfg.translation_field!r} holding keys {keys} (data.translation_field, data.src_lang, data.tgt_lang)"
            )
        src, tgt = row[cfg.src_lang], row[cfg.tgt_lang]
    else:
        if cfg.src_field not in record or cfg.tgt_field not in record:
            raise UserError(
                f"{where}: expected fields {cfg.src_field!r} and {cfg.tgt_field!r} (data.src_field, data.tgt_field); found {sorted(record)}"
            )
        src, tgt = record[cfg.src_field], record[cfg.tgt_field]
    return str(src or ""), str(tgt or "")


def read_jsonl(path: str, cfg: DataConfig) -> Iterator[Pair]:
    for number, line in open_text(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        yield pair_from_record(record, cfg, f"{path}:{number}")


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
    if cfg.source == "files":
        return list(iter_files(cfg, split))
    if cfg.source == "builtin":
        from transformer.data.builtin import builtin_splits

        return builtin_splits(cfg.builtin_train, cfg.builtin_valid, cfg.builtin_test, cfg.builtin_seed)[split]
    if cfg.source == "hub":
        if not cfg.hub_name:
            raise UserError("data.hub_name is required when data.source=hub")
        return read_hub(cfg, split)
    raise UserError(f"data.source={cfg.source!r}: expected one of builtin, files, hub")


def split_files(cfg: DataConfig, split: str) -> list[str]:
    """The local files holding ``split`` (data.source=files), checked to be set."""
    if cfg.format == "text":
        src, tgt = getattr(cfg, f"{split}_src"), getattr(cfg, f"{split}_tgt")
        if not src or not tgt:
            raise UserError(f"data.{split}_src and data.{split}_tgt must be set for data.format=text")
        return [src, tgt]
    if cfg.format not in ("tsv", "jsonl"):
        raise UserError(f"data.format={cfg.format!r}: expected one of {', '.join(DataFormat)}")
    path = getattr(cfg, f"{split}_file")
    if not path:
        raise UserError(f"data.{split}_file must be set for data.format={cfg.format}")
    return [path]


def iter_files(cfg: DataConfig, split: str) -> Iterator[Pair]:
    """Raw pairs of a split of local files, one at a time (the corpus need not fit in memory)."""
    paths = split_files(cfg, split)
    if cfg.format == "text":
        return read_text_pair(*paths)
    return read_tsv(paths[0]) if cfg.format == "tsv" else read_jsonl(paths[0], cfg)


def iter_clean(pairs: Iterable[Pair], name: str) -> Iterator[Pair]:
    """Strip whitespace, skip pairs with an empty side (counted once the corpus is read),
    fail on an empty corpus."""
    kept = skipped = 0
    for s, t in pairs:
        s, t = s.strip(), t.strip()
        if s and t:
            kept += 1
            yield s, t
        else:
            skipped += 1
    if skipped:
        log.warning("%s: skipped %d pairs with an empty side", name, skipped)
    if not kept:
        raise UserError(f"{name}: no sentence pairs (the corpus is empty or every line is blank)")


def clean_pairs(pairs: list[Pair], name: str) -> list[Pair]:
    return list(iter_clean(pairs, name))


def duplicate_mask(pairs: Iterable[Pair]) -> np.ndarray:
    """True for the first occurrence of each (source, target) pair, False for its repeats
    (data.dedup). Pairs are told apart by a 64-bit hash: 8 bytes a pair, whatever the
    corpus size; two different pairs collide with odds ~n^2 / 2^65."""
    digests = np.fromiter(
        (int.from_bytes(blake2b(f"{s}\t{t}".encode(), digest_size=8).digest(), "little") for s, t in pairs),
        dtype=np.uint64,
    )
    keep = np.zeros(len(digests), dtype=bool)
    keep[np.unique(digests, return_index=True)[1]] = True
    return keep


def log_duplicates(keep: np.ndarray, name: str) -> None:
    dropped = int(len(keep) - keep.sum())
    log.info("%s: dropped %d of %d pairs repeating an earlier pair (data.dedup)", name, dropped, len(keep))


def reversed_pairs(pairs: Iterable[Pair]) -> list[Pair]:
    """Each pair target -> source (BiT epochs, a corpus entry's ``reverse``)."""
    return [(t, s) for s, t in pairs]


def load_train_pairs(cfg: DataConfig) -> list[Pair]:
    """Clean training pairs in memory, without repeats when data.dedup is set."""
    pairs = load_split(cfg, "train")
    if not cfg.dedup:
        return pairs
    keep = duplicate_mask(pairs)
    log_duplicates(keep, f"{cfg.name} train")
    return list(itertools.compress(pairs, keep))


def load_split(cfg: DataConfig, split: str) -> list[Pair]:
    """Clean pairs of ``split`` (train, valid or test)."""
    if split not in SPLITS:
        raise UserError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    return clean_pairs(read_split(cfg, split), f"{cfg.name} {split}")


def iter_train_pairs(cfg: DataConfig) -> Iterator[Pair]:
    """Clean training pairs of local files, streamed, without repeats when data.dedup is set
    (a first pass finds them): the same pairs, in the same order, as ``load_train_pairs``."""
    name = f"{cfg.name} train"
    if not cfg.dedup:
        return iter_clean(iter_files(cfg, "train"), name)
    keep = duplicate_mask(iter_clean(iter_files(cfg, "train"), name))
    log_duplicates(keep, name)
    return itertools.compress(iter_clean(iter_files(cfg, "train"), name), keep)


def load_files(src_path: str, ref_path: str | None) -> tuple[list[str], list[str] | None]:
    """Source lines (and references) for scoring or decoding given files; blank source lines
    are kept so the output stays aligned with the input."""
    src = [line.strip() for _, line in open_text(src_path)]
    if ref_path is None:
        return src, None
    ref = [line.strip() for _, line in open_text(ref_path)]
    if len(src) != len(ref):
        raise UserError(f"{src_path} has {len(src)} lines but {ref_path} has {len(ref)}: they must align line by line")
    return src, ref
