"""One training at a time in a run directory: ``<run>/run.lock``, held with ``fcntl.flock``
for the whole run and naming the holder (pid, host, start time).

A second training, or a ``trainer.resume`` into a directory whose run still trains, stops
with one error line naming the holder. The kernel drops a flock when its process dies, so a
lock file left by a killed run is free: it is taken over with a warning naming the dead
holder. Under DDP only rank 0 takes the lock (the other ranks write nothing there).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from transformer.checkpoint import CHECKPOINT_DIR
from transformer.errors import UserError
from transformer.rundir import remove_temporary_files, write_failed

log = logging.getLogger(__name__)
LOCK = "run.lock"


def holder_text(path: Path) -> str:
    """Who the lock file says holds it, in words."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {holder['pid']} on {holder['host']} (since {holder['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def take(path: Path) -> int:
    """An open descriptor of ``path`` holding its exclusive flock, or a UserError naming
    the holder. Retries when the file it locked was removed meanwhile (the holder finished)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"{path.parent}: a training run is still writing here ({holder_text(path)}); wait for it to finish, "
                "stop it, or give another run_dir"
            ) from None
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
        os.close(fd)  # locked a file its holder had just removed: try the new one


def claim(fd: int, path: Path) -> None:
    """Write this process into the lock file, warning about a holder that died holding it."""
    previous = os.pread(fd, 4096, 0)
    if previous.strip():
        log.warning("%s: taking over the lock of %s, which is no longer running", path, holder_text(path))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, me.encode("utf-8"), 0)
    os.fsync(fd)


@contextlib.contextmanager
def hold_run_dir(run_dir: str | Path, main: bool = True) -> Iterator[None]:
    """Create ``run_dir`` and hold its lock while the block runs (rank 0 only: ``main``);
    partial files a killed run left behind are removed once the lock is ours."""
    run, path = Path(run_dir), Path(run_dir) / LOCK
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failed(run, e) from None
    if not main:
        yield
        return
    try:
        fd = take(path)
    except OSError as e:
        raise write_failed(path, e) from None
    try:
        claim(fd, path)
    except OSError as e:
        os.close(fd)
        raise write_failed(path, e) from None
    try:
        for leftover in remove_temporary_files(run, run / CHECKPOINT_DIR):
            log.info("removed %s, a partial file left by an interrupted write", leftover)
        yield
    finally:
        path.unlink(missing_ok=True)  # before the flock goes: a waiting run then locks a fresh file
        os.close(fd)
