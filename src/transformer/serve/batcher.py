"""Dynamic batching across requests: one decoding thread per model, which also supervises
the model's decoding process.

Requests put their sentences on a queue; the worker takes sentences up to
``serve.max_batch_tokens`` (source subwords x beam: the work they bring), one from each
waiting request in turn, so that a small request rides in the next batch rather than behind
every chunk of a big one; it waits at most ``serve.max_wait_ms`` for more once it holds one,
decodes those with equal options together (the decode function sorts them by length, as
``translate_ids`` does) and hands each request its answers on its event loop. Decoding runs
in the worker thread, never on the event loop.

A supervised decode function (``Worker``: a child process) that dies or hangs fails only the
requests of its batch (503); between batches the thread restarts it (with back-off when it
fails again) and restarts it too once it holds more memory than allowed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import astuple, dataclass, field
from typing import Any, Protocol

from transformer.config import DecodeConfig
from transformer.decode.translator import Translation
from transformer.errors import first_line
from transformer.serve.api import ApiError
from transformer.serve.settings import ServeConfig

log = logging.getLogger(__name__)

DecodeFn = Callable[[list[str], DecodeConfig, bool], list[list[Translation]]]
BatchHook = Callable[[list["Item"], list[list[Translation]], float], None]
IDLE_CHECK_S = 0.25  # how often an idle worker thread looks whether its decoding process still lives
MAX_BACKOFF = 32  # restart_backoff_s doubles up to this many times itself


class WorkerLost(Exception):
    """A ``Worker``'s process died or hung during a batch and has been stopped; ``reason``:
    died | hung."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class Worker(Protocol):
    """A decode function running in a process of its own, which the batcher supervises."""

    @property
    def ready(self) -> bool: ...

    def __call__(self, sentences: list[str], options: DecodeConfig, attention: bool) -> list[list[Translation]]: ...

    def memory_mb(self) -> float | None: ...

    def restart(self) -> None: ...


@dataclass(eq=False)
class Job:
    """One request's sentences on their way through the worker."""

    sentences: list[str]
    lengths: list[int]  # source subwords of each sentence (with EOS): the batch budget counts these
    options: DecodeConfig
    attention: bool  # also compute each hypothesis' cross-attention matrix
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    results: list[list[Translation] | None] = field(init=False)
    remaining: int = field(init=False)
    waiting: deque[int] = field(init=False)  # indexes of the sentences still queued
    cancelled: bool = False  # the client went away (or the request failed): its sentences are dropped

    def __post_init__(self) -> None:
        self.results = [None] * len(self.sentences)
        self.remaining = len(self.sentences)
        self.waiting = deque(range(len(self.sentences)))

    @property
    def key(self) -> tuple:
        """Jobs with equal keys decode in one batch."""
        return astuple(self.options) + (self.attention,)

    @property
    def rows(self) -> int:
        """Search rows per sentence: the beam (sampling: the samples)."""
        return self.options.n_best if self.options.sampling else self.options.beam_size

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

    @property
    def cost(self) -> int:
        """What the sentence weighs in a batch: source subwords x search rows."""
        return self.length * self.job.rows


class Batcher:
    """The queue, decoding thread and (for a ``Worker``) supervisor of one model."""

    def __init__(
        self,
        name: str,
        decode: DecodeFn,
        cfg: ServeConfig,
        on_batch: BatchHook,
        worker: Worker | None = None,
        on_restart: Callable[[str], None] = lambda reason: None,
    ):
        self.name, self.decode, self.cfg, self.on_batch = name, decode, cfg, on_batch
        self.worker, self.on_restart = worker, on_restart
        self.jobs: deque[Job] = deque()  # requests with sentences waiting, served in turn
        self.pending = 0  # sentences admitted and not yet answered (bounded by serve.max_queue)
        self.cond = threading.Condition()
        self.closing = False
        self.restarting = False  # the decoding process is being (re)started
        self.down: str | None = None  # why the last restart failed (requests get 503 until one succeeds)
        self.failures = 0  # worker losses and failed restarts since the last good batch (the back-off)
        self.thread = threading.Thread(target=self.run, name=f"decode-{name}", daemon=True)

    @property
    def ready(self) -> bool:
        """The model can decode now."""
        return not self.restarting and self.down is None and (self.worker is None or self.worker.ready)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Decode what is queued, then stop the worker thread."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.thread.join()

    def submit(self, job: Job) -> None:
        """Queue the job's sentences; ApiError 429 when that would pass ``serve.max_queue``,
        503 while the decoding process cannot be started."""
        with self.cond:
            if self.down is not None:
                raise ApiError(
                    503,
                    f"model {self.name}: {self.down}; retry later",
                    headers={"Retry-After": str(max(1, round(self.backoff())))},
                )
            if self.pending + len(job.sentences) > self.cfg.max_queue:
                raise ApiError(
                    429,
                    f"model {self.name}: queue full ({self.pending} sentences waiting, "
                    f"serve.max_queue={self.cfg.max_queue}); retry later",
                    headers={"Retry-After": str(self.cfg.retry_after_s)},
                )
            self.pending += len(job.sentences)
            self.jobs.append(job)
            self.cond.notify()

    def release(self, job: Job) -> None:
        """The request is over (answered, failed or cancelled): its sentences leave the count."""
        with self.cond:
            self.pending -= len(job.sentences)

    def cancel(self, job: Job) -> None:
        """Drop the job's sentences that are still queued; a batch holding others ignores them."""
        job.cancelled = True
        with self.cond:
            if job in self.jobs:
                self.jobs.remove(job)

    def queued(self) -> int:
        """Sentences waiting for the worker."""
        with self.cond:
            return sum(len(job.waiting) for job in self.jobs)

    def run(self) -> None:
        while (items := self.collect()) is not None:
            self.decode_items([item for item in items if not item.job.cancelled])
            if self.worker is not None:
                self.supervise()

    def take(self) -> Item:
        """The next sentence of the request whose turn it is (then the next request's turn)."""
        job = self.jobs.popleft()
        item = Item(job, job.waiting.popleft())
        if job.waiting:
            self.jobs.append(job)
        return item

    def collect(self) -> list[Item] | None:
        """The next batch (None once closing with nothing queued; empty when an idle worker
        should be looked at). Without batching: the sentences of the oldest request only."""
        with self.cond:
            while not self.jobs and not self.closing:
                if not self.cond.wait(IDLE_CHECK_S) and self.worker is not None and not self.worker.ready:
                    return []
            if not self.jobs:
                return None
            if not self.cfg.batching:
                job = self.jobs.popleft()
                items = [Item(job, i) for i in job.waiting]
                job.waiting.clear()
                return items
            deadline = time.monotonic() + self.cfg.max_wait_ms / 1000
            items, tokens = [], 0
            while True:
                while self.jobs and (not items or tokens + self.peek_cost() <= self.cfg.max_batch_tokens):
                    items.append(self.take())
                    tokens += items[-1].cost
                left = deadline - time.monotonic()
                if self.jobs or left <= 0 or self.closing:  # full (the next does not fit), or time is up
                    return items
                self.cond.wait(left)

    def peek_cost(self) -> int:
        job = self.jobs[0]
        return Item(job, job.waiting[0]).cost

    def decode_items(self, items: list[Item]) -> None:
        """Decode each group of equal options as one batch, the cheapest first, and route the
        answers. A lost worker fails the requests of its batch; the other groups go back to
        the queue."""
        groups: dict[tuple, list[Item]] = {}
        for item in items:
            groups.setdefault(item.job.key, []).append(item)
        pending = sorted(groups.values(), key=lambda group: sum(i.cost for i in group))  # small requests first
        while pending:
            group = pending.pop(0)
            try:
                self.decode_group(group)
                self.failures = 0
            except WorkerLost as e:
                log.error("model %s: a batch of %d sentences was lost: %s", self.name, len(group), e)
                self.failures += 1
                self.fail({id(i.job): i.job for i in group}.values(), self.refusal(e))
                self.requeue([item for rest in pending for item in rest])
                self.restart(e.reason)
                return
            except Exception as e:  # one bad batch fails its requests, not the worker
                log.error("model %s: decoding a batch of %d sentences failed: %s", self.name, len(group), first_line(e))
                self.fail({id(i.job): i.job for i in group}.values(), e)

    def decode_group(self, group: list[Item]) -> None:
        job = group[0].job
        started = time.perf_counter()
        results = self.decode([i.job.sentences[i.index] for i in group], job.options, job.attention)
        self.on_batch(group, results, time.perf_counter() - started)
        for item, hyps in zip(group, results):
            item.job.results[item.index] = hyps
            item.job.remaining -= 1
            if item.job.remaining == 0:
                item.job.answer(item.job.results)

    def refusal(self, e: Exception) -> ApiError:
        return ApiError(
            503,
            f"model {self.name}: {e}; the requests in that batch were lost and the process is restarting: retry",
            headers={"Retry-After": str(max(1, round(self.backoff())))},
        )

    def fail(self, jobs: Any, error: BaseException) -> None:
        """Answer ``jobs`` with ``error`` and drop their sentences still queued."""
        for job in list(jobs):
            job.answer(error=error)
            self.cancel(job)

    def requeue(self, items: list[Item]) -> None:
        """Sentences taken for a batch that did not run: first in line again."""
        with self.cond:
            for job in {id(i.job): i.job for i in items}.values():
                job.waiting.extendleft(sorted((i.index for i in items if i.job is job), reverse=True))
                if job not in self.jobs:
                    self.jobs.appendleft(job)

    def supervise(self) -> None:
        """Between batches: restart a process that died while idle or holds too much memory."""
        assert self.worker is not None
        if not self.worker.ready:
            self.failures += 1
            self.restart("died")
        elif (used := self.worker.memory_mb()) is not None:
            log.warning(
                "model %s: the decoding process holds %.0f MiB > serve.worker_max_rss_mb=%d: restarting it",
                self.name,
                used,
                self.cfg.worker_max_rss_mb,
            )
            self.restart("memory")

    def backoff(self) -> float:
        """Seconds to wait before the next restart: none for a first loss, then doubling."""
        if self.failures <= 1:
            return 0.0
        return self.cfg.restart_backoff_s * min(2 ** (self.failures - 2), MAX_BACKOFF)

    def restart(self, reason: str) -> None:
        """Start the decoding process again, retrying with back-off; while it fails, queued
        and new requests get 503."""
        assert self.worker is not None
        self.restarting = True
        try:
            while not self.closing:
                with self.cond:
                    self.cond.wait_for(lambda: self.closing, timeout=self.backoff())
                self.on_restart(reason)
                try:
                    self.worker.restart()
                except Exception as e:
                    self.failures += 1
                    self.down = f"the decoding process failed to restart ({first_line(e)})"
                    log.error("model %s: %s; next try in %.1f s", self.name, self.down, self.backoff())
                    with self.cond:
                        failed, self.jobs = list(self.jobs), deque()
                    self.fail(failed, ApiError(503, f"model {self.name}: {self.down}; retry later"))
                    continue
                self.down = None
                log.info("model %s: decoding process restarted (%s)", self.name, reason)
                return
        finally:
            self.restarting = False
