"""Dynamic batching across requests: one decoding thread per model.

Requests put their sentences on a queue; the worker takes sentences up to
``serve.max_batch_tokens`` source subwords (waiting at most ``serve.max_wait_ms`` for more
once it holds one), decodes those with equal options together (the decode function sorts
them by length, as ``translate_ids`` does) and hands each request its answers on its event
loop. Decoding runs in the worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import astuple, dataclass, field
from typing import Any

from transformer.config import DecodeConfig
from transformer.decode.translator import Translation
from transformer.serve.settings import ServeConfig

log = logging.getLogger(__name__)

DecodeFn = Callable[[list[str], DecodeConfig, bool], list[list[Translation]]]
BatchHook = Callable[[list["Item"], list[list[Translation]], float], None]


@dataclass(eq=False)
class Job:
    """One request's sentences on their way through the worker."""

    sentences: list[str]
    lengths: list[int]  # source subwords of each sentence (with EOS): the batch budget counts these
    options: DecodeConfig
    alignment: bool  # also compute each hypothesis' cross-attention
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    results: list[list[Translation] | None] = field(init=False)
    remaining: int = field(init=False)
    cancelled: bool = False  # the client went away: its sentences are dropped from the queue

    def __post_init__(self) -> None:
        self.results = [None] * len(self.sentences)
        self.remaining = len(self.sentences)

    @property
    def key(self) -> tuple:
        """Jobs with equal keys decode in one batch."""
        return astuple(self.options) + (self.alignment,)

    def answer(self, result: Any = None, error: BaseException | None = None) -> None:
        """Resolve the request's future from the worker thread (a no-op once it is done)."""

        def settle() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is closed: nobody waits for this answer any more
            pass


@dataclass(eq=False)
class Item:
    """One sentence of a job."""

    job: Job
    index: int

    @property
    def length(self) -> int:
        return self.job.lengths[self.index]


class Batcher:
    """The queue and decoding worker of one model."""

    def __init__(self, name: str, decode: DecodeFn, cfg: ServeConfig, on_batch: BatchHook):
        self.name, self.decode, self.cfg, self.on_batch = name, decode, cfg, on_batch
        self.queue: deque[Item] = deque()
        self.pending = 0  # sentences admitted and not yet answered (bounded by serve.max_queue)
        self.cond = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self.run, name=f"decode-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Decode what is queued, then stop the worker."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.thread.join()

    def submit(self, job: Job) -> bool:
        """Queue the job's sentences; False when that would pass ``serve.max_queue``."""
        with self.cond:
            if self.pending + len(job.sentences) > self.cfg.max_queue:
                return False
            self.pending += len(job.sentences)
            self.queue.extend(Item(job, i) for i in range(len(job.sentences)))
            self.cond.notify()
        return True

    def release(self, job: Job) -> None:
        """The request is over (answered, failed or cancelled): its sentences leave the count."""
        with self.cond:
            self.pending -= len(job.sentences)

    def cancel(self, job: Job) -> None:
        """Drop the job's sentences that are still queued; a batch holding others ignores them."""
        job.cancelled = True
        with self.cond:
            self.queue = deque(item for item in self.queue if item.job is not job)

    def queued(self) -> int:
        """Sentences waiting for the worker."""
        return len(self.queue)

    def run(self) -> None:
        while (items := self.collect()) is not None:
            self.decode_items([item for item in items if not item.job.cancelled])

    def collect(self) -> list[Item] | None:
        """The next batch (None once closing with nothing queued). Without batching: the
        sentences of the oldest request only, at once."""
        with self.cond:
            while not self.queue and not self.closing:
                self.cond.wait()
            if not self.queue:
                return None
            if not self.cfg.batching:
                job = self.queue[0].job
                items = []
                while self.queue and self.queue[0].job is job:
                    items.append(self.queue.popleft())
                return items
            deadline = time.monotonic() + self.cfg.max_wait_ms / 1000
            items, tokens = [], 0
            while True:
                while self.queue and (not items or tokens + self.queue[0].length <= self.cfg.max_batch_tokens):
                    item = self.queue.popleft()
                    items.append(item)
                    tokens += item.length
                left = deadline - time.monotonic()
                if self.queue or left <= 0 or self.closing:  # full (the next does not fit), or time is up
                    return items
                self.cond.wait(left)

    def decode_items(self, items: list[Item]) -> None:
        """Decode each group of equal options as one batch and route the answers."""
        groups: dict[tuple, list[Item]] = {}
        for item in items:
            groups.setdefault(item.job.key, []).append(item)
        for group in groups.values():
            job = group[0].job
            started = time.perf_counter()
            try:
                results = self.decode([i.job.sentences[i.index] for i in group], job.options, job.alignment)
            except Exception as e:  # one bad batch fails its requests, not the worker
                log.exception("decoding a batch of %d sentences failed", len(group))
                for owner in {id(i.job): i.job for i in group}.values():
                    owner.answer(error=e)
                continue
            self.on_batch(group, results, time.perf_counter() - started)
            for item, hyps in zip(group, results):
                item.job.results[item.index] = hyps
                item.job.remaining -= 1
                if item.job.remaining == 0:
                    item.job.answer(item.job.results)
