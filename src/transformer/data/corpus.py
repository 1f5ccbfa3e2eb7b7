"""Reading and cleaning parallel text: plain-text pairs (optionally .gz), TSV and JSON lines
files, dataset records; whitespace stripped, pairs with an empty side skipped and counted,
repeats found (data.dedup). The sources (``data/sources.py``) read through these.

Every reading error names the file and line.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from hashlib import blake2b
from pathlib import Path

import numpy as np

from transformer.config import DataConfig
from transformer.errors import UserError

log = logging.getLogger(__name__)

Pair = tuple[str, str]
EDGE_BYTES = 1 << 20  # hashed at each end of a file by file_identity


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


def file_identity(path: str) -> dict:
    """What tells a corpus file apart without reading it all: path, size, mtime and a hash of
    its first and last MiB."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{path}: file not found")
    st = p.stat()
    h = blake2b(digest_size=16)
    with open(p, "rb") as f:
        h.update(f.read(EDGE_BYTES))
        f.seek(max(st.st_size - EDGE_BYTES, 0))
        h.update(f.read(EDGE_BYTES))
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "edges": h.hexdigest()}


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
