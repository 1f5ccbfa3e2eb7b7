"""Decoding in a supervised child process (``serve.decode_process``), so that the search's
Python code does not take the GIL from the event loop: with both in one process, requests
wait to be read while a batch decodes, and batches stay small however many clients there are.

The batcher's thread sends one batch at a time through a pipe (from a helper thread, so a
child that stops reading cannot block it) and waits (without the GIL) for its n-best lists,
or for the child's exit, at most ``serve.batch_timeout_s``. A child
that dies (kill -9, the kernel's OOM killer) or hangs raises ``WorkerLost`` for that batch;
the batcher answers its requests 503 and calls ``restart``. The child ignores SIGINT and
SIGTERM (the server drains first, then closes it) and leaves quietly when the pipe closes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from dataclasses import asdict
from multiprocessing.connection import wait
from typing import Any

from transformer.config import DecodeConfig
from transformer.decode.translator import Translation
from transformer.errors import UserError, first_line
from transformer.serve.batcher import WorkerLost
from transformer.serve.settings import ServeConfig

START_TIMEOUT_S = 600.0  # loading a checkpoint and its warm-up translation


def decode_loop(conn: Any, path: str, device: str, decode: dict, threads: int) -> None:
    """The child: load the checkpoint, say ready, then answer batches until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch

    from transformer.serve.models import load_translator

    if threads > 0:
        torch.set_num_threads(threads)
    try:
        translator = load_translator(path, device, DecodeConfig(**decode))[0]
    except Exception as e:  # a UserError included: the parent raises it
        conn.send(("error", first_line(e)))
        return
    try:
        conn.send(("ready", None))
        while (batch := conn.recv()) is not None:
            sentences, options, attention = batch
            try:
                conn.send(("ok", translator.hypotheses(sentences, attention=attention, **options)))
            except Exception as e:
                conn.send(("error", first_line(e)))
    except (EOFError, OSError):  # the server closed the pipe or died: nobody waits for an answer
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the interpreter's teardown (torch's thread pools) takes seconds, and a restart waits for it


def send_quietly(conn: Any, message: Any) -> None:
    try:
        conn.send(message)
    except OSError:  # the child is gone: the receiving side says so
        pass


def rss_mb(pid: int) -> float | None:
    """Resident memory of process ``pid`` in MiB (None where /proc does not tell)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        hint = " (kill -9 or the kernel's out-of-memory killer)" if code == -signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with status {code}"


class ProcessDecoder:
    """The decode function of a model whose search runs in a supervised child process."""

    def __init__(self, path: str, device: str, decode: DecodeConfig, threads: int, cfg: ServeConfig):
        self.args = (path, device, asdict(decode), threads)
        self.batch_timeout_s = cfg.batch_timeout_s
        self.max_rss_mb = cfg.worker_max_rss_mb
        self.process: Any = None
        self.conn: Any = None
        self.start()

    @property
    def ready(self) -> bool:
        """The child has loaded its model and lives."""
        return self.process is not None and self.process.is_alive()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        """Start a child and wait until its model is loaded (UserError when it cannot be)."""
        context = multiprocessing.get_context("spawn")  # no fork of a process holding torch's thread pools
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=decode_loop, args=(child, *self.args), daemon=True, name="transformer-serve-decode"
        )
        self.process.start()
        child.close()  # the child holds the only other end: its exit is an EOF here
        try:
            status, message = self.receive(START_TIMEOUT_S)
        except TimeoutError:
            status, message = "error", f"not ready within {START_TIMEOUT_S:g} s"
        except (EOFError, OSError):
            status, message = "error", exit_reason(self.stop())
        if status != "ready":
            self.stop()
            raise UserError(f"{self.args[0]}: the decoding process failed to start: {message}")

    def receive(self, timeout: float) -> Any:
        """The child's next message; EOFError once it is gone, TimeoutError after ``timeout``."""
        ready = wait([self.conn, self.process.sentinel], timeout)
        if not ready:
            raise TimeoutError
        if self.conn in ready:
            return self.conn.recv()
        raise EOFError

    def __call__(self, sentences: list[str], options: DecodeConfig, attention: bool) -> list[list[Translation]]:
        if not self.ready:
            raise WorkerLost(f"the decoding process is not running ({exit_reason(self.stop())})", "died")
        batch = (sentences, asdict(options), attention)
        # sent from a thread: a hung child stops reading, and a batch larger than the pipe would block here
        threading.Thread(target=send_quietly, args=(self.conn, batch), daemon=True).start()
        try:
            status, value = self.receive(self.batch_timeout_s)
        except TimeoutError:  # an OSError too: caught first
            self.stop()
            raise WorkerLost(
                f"the batch took longer than serve.batch_timeout_s={self.batch_timeout_s:g}; "
                "the decoding process was stopped",
                "hung",
            ) from None
        except (EOFError, OSError):
            raise WorkerLost(
                f"the decoding process died during this batch ({exit_reason(self.stop())})", "died"
            ) from None
        if status != "ok":
            raise RuntimeError(f"decoding failed: {value}")
        return value

    def memory_mb(self) -> float | None:
        """The child's resident memory when it is past ``serve.worker_max_rss_mb`` (else None)."""
        if self.max_rss_mb <= 0 or not self.ready:
            return None
        used = rss_mb(self.process.pid)
        return used if used is not None and used > self.max_rss_mb else None

    def restart(self) -> None:
        """Stop the child (between batches: nothing is lost) and start a new one."""
        self.close()
        self.start()

    def stop(self) -> int | None:
        """Kill the child at once; its exit code."""
        if self.process is None:
            return None
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()
        return self.process.exitcode

    def close(self) -> None:
        """Ask the child to stop after its batch; kill it if it does not within 10 s."""
        if self.process is None or not self.process.is_alive():
            self.stop()
            return
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(10)
        self.stop()
