"""Counters, gauges and histograms in memory, written in the Prometheus text format (0.0.4).

Thread-safe: the decoding workers and the event loop both record. Kept to what /metrics
needs rather than adding prometheus_client to the extra."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

LabelKey = tuple[tuple[str, str], ...]
M = TypeVar("M", bound="Metric")


def _labels(key: LabelKey, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = key + extra
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if value != int(value) else str(int(value))


class Metric:
    """One metric family: a name, a help line, a type and its samples by label set."""

    kind = "untyped"

    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self.lock = threading.Lock()

    def samples(self) -> Iterator[str]:
        raise NotImplementedError

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        with self.lock:
            lines.extend(self.samples())
        return "\n".join(lines)


class Counter(Metric):
    kind = "counter"

    def __init__(self, name: str, help: str):
        super().__init__(name, help)
        self.values: dict[LabelKey, float] = {}

    def inc(self, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + value

    def samples(self) -> Iterator[str]:
        for key, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(key)} {_number(value)}"


class Gauge(Metric):
    """A value read when /metrics is asked for (``read`` returns {labels: value})."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], dict[LabelKey, float]]):
        super().__init__(name, help)
        self.read = read

    def samples(self) -> Iterator[str]:
        for key, value in sorted(self.read().items()):
            yield f"{self.name}{_labels(key)} {_number(value)}"


class Histogram(Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float]):
        super().__init__(name, help)
        self.bounds = sorted(buckets) + [math.inf]
        self.values: dict[LabelKey, tuple[list[int], float]] = {}  # per label set: bucket counts, sum

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            counts, total = self.values.get(key, ([0] * len(self.bounds), 0.0))
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    counts[i] += 1
            self.values[key] = (counts, total + value)

    def samples(self) -> Iterator[str]:
        for key, (counts, total) in sorted(self.values.items()):
            for bound, count in zip(self.bounds, counts):
                yield f"{self.name}_bucket{_labels(key, (('le', _number(bound)),))} {count}"
            yield f"{self.name}_sum{_labels(key)} {_number(total)}"
            yield f"{self.name}_count{_labels(key)} {counts[-1]}"


class Registry:
    """The metrics of one server, in the order they were added."""

    def __init__(self) -> None:
        self.metrics: list[Metric] = []

    def add(self, metric: M) -> M:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(m.render() for m in self.metrics) + "\n"


SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    """What GET /metrics reports of a server; ``gauges`` maps a name to (help, read)."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], dict[LabelKey, float]]]]):
        r = self.registry = Registry()
        self.requests = r.add(
            Counter("transformer_serve_requests_total", "HTTP requests answered, by path and status code")
        )
        self.sentences = r.add(Counter("transformer_serve_sentences_total", "sentences translated, by model"))
        self.source_tokens = r.add(
            Counter("transformer_serve_source_tokens_total", "source subwords translated (with EOS)")
        )
        self.target_tokens = r.add(
            Counter("transformer_serve_target_tokens_total", "subwords of the best hypotheses (with EOS)")
        )
        self.restarts = r.add(
            Counter(
                "transformer_serve_worker_restarts_total",
                "restarts of a model's decoding process, by reason (died, hung, memory)",
            )
        )
        self.cancelled = r.add(
            Counter("transformer_serve_cancelled_requests_total", "requests dropped because their client went away")
        )
        self.batch_sentences = r.add(
            Histogram(
                "transformer_serve_batch_sentences",
                "sentences per decoded batch",
                (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            )
        )
        self.batch_requests = r.add(
            Histogram(
                "transformer_serve_batch_requests",
                "requests with sentences in a decoded batch",
                (1, 2, 4, 8, 16, 32, 64),
            )
        )
        self.batch_seconds = r.add(Histogram("transformer_serve_batch_seconds", "decoding time of a batch", SECONDS))
        self.latency = r.add(
            Histogram("transformer_serve_request_seconds", "translate requests: time from arrival to answer", SECONDS)
        )
        for name, (help, read) in gauges.items():
            r.add(Gauge(name, help, read))

    def batch(
        self, model: str, lengths: Sequence[int], requests: int, target_lengths: Sequence[int], seconds: float
    ) -> None:
        """One decoded batch of ``len(lengths)`` sentences from ``requests`` requests."""
        self.batch_sentences.observe(len(lengths), model=model)
        self.batch_requests.observe(requests, model=model)
        self.batch_seconds.observe(seconds, model=model)
        self.sentences.inc(len(lengths), model=model)
        self.source_tokens.inc(sum(lengths), model=model)
        self.target_tokens.inc(sum(target_lengths), model=model)

    def render(self) -> str:
        return self.registry.render()
