"""Decoding in a child process (``serve.decode_process``), so that the search's Python code
does not take the GIL from the event loop: with both in one process, requests wait to be
read while a batch decodes, and batches stay small however many clients there are.

The batcher's thread sends one batch at a time through a pipe and waits (without the GIL)
for its n-best lists. The child ignores SIGINT and SIGTERM: the server drains first, then
closes it.
"""

from __future__ import annotations

import multiprocessing
import signal
from dataclasses import asdict
from typing import Any

from transformer.config import DecodeConfig
from transformer.decode.translator import Translation
from transformer.errors import UserError, first_line


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
    conn.send(("ready", None))
    while (batch := conn.recv()) is not None:
        sentences, options, alignment = batch
        try:
            conn.send(("ok", translator.hypotheses(sentences, attention=alignment, **options)))
        except Exception as e:
            conn.send(("error", first_line(e)))


class ProcessDecoder:
    """The decode function of a model whose search runs in a child process."""

    def __init__(self, path: str, device: str, decode: DecodeConfig, threads: int):
        context = multiprocessing.get_context("spawn")  # no fork of a process holding torch's thread pools
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=decode_loop,
            args=(child, path, device, asdict(decode), threads),
            daemon=True,
            name="transformer-serve-decode",
        )
        self.process.start()
        status, message = self.conn.recv()
        if status != "ready":
            self.process.join(5)
            raise UserError(f"{path}: the decoding process failed to start: {message}")

    def __call__(self, sentences: list[str], options: DecodeConfig, alignment: bool) -> list[list[Translation]]:
        self.conn.send((sentences, asdict(options), alignment))
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"decoding failed: {value}")
        return value

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send(None)
            self.process.join(10)
