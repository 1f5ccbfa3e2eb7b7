"""The training split of a source that can be cached (local files), tokenised once and
memory-mapped (``data.cache``).

The first run streams the corpus in chunks (memory bounded by a chunk, not the corpus),
encodes it with SentencePiece through a per-word cache (``word_encoder``) and writes flat
token-id arrays (uint16 when the vocabulary allows, else int32) plus int64 offsets into
``<cache_dir>/train-<key>/``; the directory is built under a temporary name and renamed, so
a cache is either whole or absent. Later runs, resumes and every DDP rank map the arrays
(``np.memmap``: pages are shared, nothing is copied) and build a batch's examples from them
when it is collated. The BPE model trained on the same corpus is kept beside it
(``bpe-<key>/``), so a fresh run on a cached corpus starts without training or encoding.

A key is a hash of everything the arrays depend on: the source's ``identity`` (for files, each
file's path, size, mtime and a hash of its first and last MiB, and the reading options and
dedup); the tokenizer's model bytes; the length and ratio filters. Touching a file gives it
a new key. A cache whose files do not match the sizes and blake2b digests in its
``meta.json`` is rebuilt with a warning.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from transformer.config import DataConfig
from transformer.data.batching import Example, chunked, keep_mask, log_dropped
from transformer.data.corpus import Pair
from transformer.data.sources import Source
from transformer.data.tokenizer import BPE_SAMPLE_SEED, Tokenizer, build_tokenizer
from transformer.data.word_encoder import FlatIds
from transformer.errors import UserError

log = logging.getLogger(__name__)

VERSION = 1  # bump when the layout changes: old caches are then simply not found
CHUNK_PAIRS = 50_000  # pairs read and encoded at a time (~20 MB of text and ids)
SIDES = ("src", "tgt")


class CorruptCache(Exception):
    """A cache directory that must not be read."""


def cache_root(cfg: DataConfig, run_dir: Path) -> Path:
    """data.cache_dir, else ``cache/`` beside the run directory (``runs/<data.name>/cache``
    with the default Hydra layout): every run, resume and sweep job on the data shares it."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path(run_dir).resolve().parent / "cache"


def corpus_identity(source: Source) -> dict:
    """The training split and how it is read into pairs (``Source.identity``), and the layout."""
    return {"version": VERSION} | source.identity()


def digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def publish(tmp: Path, final: Path) -> None:
    """Rename a finished build into place; another process that got there first wins."""
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_tokenizer(source: Source, root: Path) -> Tokenizer:
    """The BPE model of this corpus and these tokenizer settings: read from the cache, or
    trained on a sample of the streamed corpus and stored there."""
    cfg = source.cfg
    settings = {
        "vocab_size": cfg.vocab_size,
        "joint": cfg.joint_vocab,
        "sample": cfg.tokenizer_sample,
        "seed": BPE_SAMPLE_SEED,
    }
    directory = root / f"bpe-{digest(corpus_identity(source) | settings)}"
    tok = Tokenizer.load(directory)
    if tok is not None:
        log.info("reusing the BPE model cached in %s", directory)
        return tok
    tok = build_tokenizer(source.iter_train(), cfg.vocab_size, cfg.joint_vocab, cfg.tokenizer_sample)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    tok.save(tmp)
    publish(tmp, directory)
    return tok


def open_corpus(source: Source, tokenizer: Tokenizer, max_len: int, root: Path) -> CachedCorpus:
    """The training split as memory-mapped examples, encoding it first if no valid cache exists."""
    cfg = source.cfg
    proto = hashlib.sha256(tokenizer.src_proto + b"\0" + tokenizer.tgt_proto).hexdigest()
    key = corpus_identity(source) | {"tokenizer": proto, "max_len": max_len, "max_len_ratio": cfg.max_len_ratio}
    directory = root / f"train-{digest(key)}"
    if directory.exists():
        try:
            return CachedCorpus(directory)
        except CorruptCache as e:
            log.warning("%s: %s; rebuilding the cache", directory, e)
            shutil.rmtree(directory, ignore_errors=True)
    log.info("encoding %s train into %s (once: later runs map it)", cfg.name, directory)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.time()
    dtype = np.uint16 if max(tokenizer.src_vocab_size, tokenizer.tgt_vocab_size) <= 1 << 16 else np.int32
    n = write_arrays(tmp, encoded_chunks(source, tokenizer, max_len), dtype, key)
    seconds = time.time() - start
    size = sum(p.stat().st_size for p in tmp.iterdir()) / 2**20
    log.info("encoded %d pairs in %.1f s (%.0f pairs/s): %.1f MiB on disk", n, seconds, n / max(seconds, 1e-9), size)
    publish(tmp, directory)
    return CachedCorpus(directory)


def encoded_chunks(source: Source, tokenizer: Tokenizer, max_len: int) -> Iterator[tuple[FlatIds, FlatIds]]:
    """Kept (source, target) ids of the corpus as flat arrays, a chunk at a time; the
    filters' counts are logged at the end, as ``encode_examples`` logs them."""
    cfg, total, too_long, bad_ratio = source.cfg, 0, 0, 0
    for src, tgt in encode_in_workers(chunked(source.iter_train(), CHUNK_PAIRS), tokenizer, cfg):
        kept, long = keep_mask(src[1], tgt[1], max_len, cfg.max_len_ratio)
        total, too_long, bad_ratio = (
            total + len(kept),
            too_long + int(long.sum()),
            bad_ratio + int((~kept).sum() - long.sum()),
        )
        yield keep(src, kept), keep(tgt, kept)
    log_dropped(f"{cfg.name} train", total, too_long, bad_ratio, max_len, cfg.max_len_ratio)


def encode_workers(cfg: DataConfig) -> int:
    """data.encode_workers, where 0 is one per core this process may use."""
    if cfg.encode_workers < 0:
        raise UserError(f"data.encode_workers={cfg.encode_workers}: expected 0 (one per core) or a positive count")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cfg.encode_workers or cores


def encode_in_workers(
    chunks: Iterator[list[Pair]], tokenizer: Tokenizer, cfg: DataConfig
) -> Iterator[tuple[FlatIds, FlatIds]]:
    """Each chunk's (source, target) ids in corpus order, encoded by a pool of forked processes while this
    one reads ahead: at most two chunks per worker are in flight, so memory stays bounded.
    With one worker, or off Linux (where forking a process that holds torch is not safe),
    this process encodes."""
    workers = encode_workers(cfg)
    if workers == 1 or sys.platform != "linux":
        yield from map(tokenizer.encode_pairs_flat, chunks)
        return
    pending: collections.deque = collections.deque()
    with multiprocessing.get_context("fork").Pool(workers, _start_worker, (tokenizer.to_state(),)) as pool:
        for pairs in chunks:
            pending.append(pool.apply_async(_encode_chunk, (pairs,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


_worker_tokenizer: Tokenizer | None = None  # set in each encoding worker by _start_worker


def _start_worker(state: dict) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_state(state)


def _encode_chunk(pairs: list[Pair]) -> tuple[FlatIds, FlatIds]:
    assert _worker_tokenizer is not None
    return _worker_tokenizer.encode_pairs_flat(pairs)


def keep(ids: FlatIds, kept: np.ndarray) -> FlatIds:
    """The sequences of ``ids`` where ``kept`` is true."""
    flat, lengths = ids
    return flat[np.repeat(kept, lengths)], lengths[kept]


def write_arrays(directory: Path, chunks: Iterator[tuple[FlatIds, FlatIds]], dtype: type, key: dict) -> int:
    """``src.bin``/``tgt.bin`` (ids), ``src.off.npy``/``tgt.off.npy`` (offsets), then
    ``meta.json`` with each file's size and digest, written last; returns the pair count."""
    hashes = {side: hashlib.blake2b(digest_size=16) for side in SIDES}
    lengths: dict[str, list[np.ndarray]] = {side: [] for side in SIDES}
    files = {side: open(directory / f"{side}.bin", "wb") for side in SIDES}
    try:
        for chunk in chunks:
            for side, (flat, side_lengths) in zip(SIDES, chunk):
                data = flat.astype(dtype).tobytes()
                files[side].write(data)
                hashes[side].update(data)
                lengths[side].append(side_lengths)
    finally:
        for f in files.values():
            f.close()
    n = sum(map(len, lengths["src"]))
    if n == 0:
        raise UserError(f"{directory.parent}: every training pair was dropped by data.max_len / data.max_len_ratio")
    meta: dict = {"pairs": n, "dtype": np.dtype(dtype).name, "key": key, "files": {}}
    for side in SIDES:
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths[side]))]).astype(np.int64)
        np.save(directory / f"{side}.off.npy", offsets)
        meta["files"][f"{side}.off.npy"] = file_digest(directory / f"{side}.off.npy")
        meta["files"][f"{side}.bin"] = {
            "bytes": (directory / f"{side}.bin").stat().st_size,
            "blake2b": hashes[side].hexdigest(),
        }
    (directory / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return n


def file_digest(path: Path) -> dict:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return {"bytes": path.stat().st_size, "blake2b": h.hexdigest()}


class CachedCorpus(Sequence[Example]):
    """Training examples read from the cache's arrays; ``lengths`` is the (n, 2) array batching
    packs by (source length, target length without BOS)."""

    def __init__(self, directory: Path):
        try:
            meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
            for name, expected in meta["files"].items():
                if not (directory / name).is_file() or file_digest(directory / name) != expected:
                    raise CorruptCache(f"{name} does not match meta.json (damaged or cut short)")
            self.ids = {side: np.memmap(directory / f"{side}.bin", dtype=meta["dtype"], mode="r") for side in SIDES}
            self.offsets = {side: np.load(directory / f"{side}.off.npy", mmap_mode="r") for side in SIDES}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptCache(f"unreadable ({e})") from None
        self.directory = directory
        self.lengths = np.stack([np.diff(self.offsets["src"]), np.diff(self.offsets["tgt"]) - 1], axis=1)
        if len(self.lengths) != meta["pairs"]:
            raise CorruptCache("offsets do not match the pair count")

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> Example:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        src, tgt = (self.ids[s][int(self.offsets[s][i]) : int(self.offsets[s][i + 1])].tolist() for s in SIDES)
        return Example(src, tgt)
