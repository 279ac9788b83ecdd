"""The server's counters and histograms, written out in Prometheus' text exposition format (version 0.0.4).

Plain Python, thread-safe (one lock): the HTTP handlers count requests and errors, the batcher's worker thread
counts passes. `render()` is what `GET /metrics` returns.
"""

from __future__ import annotations

import math
import threading

PREFIX = "roberta_lite_"
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ADAPTERS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    quoted = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, quoted)) + "}"


def _number(x: float) -> str:
    if x == math.inf:
        return "+Inf"
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative (rendered cumulatively)
        self.total = 0
        self.sum = 0.0

    def observe(self, x: float):
        for i, b in enumerate(self.buckets):
            if x <= b:
                self.counts[i] += 1
                break
        self.total += 1
        self.sum += x

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for b, c in zip(self.buckets, self.counts):
            running += c
            out.append(f'{name}_bucket{{le="{_number(b)}"}} {running}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {_number(self.sum)}",
                f"{name}_count {self.total}"]
        return out


class Metrics:
    """Everything /metrics reports. Counters are keyed by their label values."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple, int] = {}  # (("adapter", a),) -> count
        self.errors: dict[tuple, int] = {}  # (("adapter", a), ("code", "400")) -> count
        self.texts: dict[tuple, int] = {}  # (("adapter", a),) -> texts answered
        self.batches = 0
        self.batch_rows = Histogram(ROWS)
        self.batch_adapters = Histogram(ADAPTERS)
        self.queue_wait = Histogram(SECONDS)
        self.latency = Histogram(SECONDS)
        self.queued = 0  # texts accepted and not yet answered (set by the batcher)

    def request(self, adapter: str, status: int, texts: int, seconds: float):
        """One /v1/predict answer: counted by adapter, an error also by status code; its latency observed."""
        with self._lock:
            key = (("adapter", adapter),)
            self.requests[key] = self.requests.get(key, 0) + 1
            if status >= 400:
                k = key + (("code", str(status)),)
                self.errors[k] = self.errors.get(k, 0) + 1
            else:
                self.texts[key] = self.texts.get(key, 0) + texts
            self.latency.observe(seconds)

    def batch(self, rows: int, adapters: int, waits: list[float]):
        """One forward pass of `rows` examples mixing `adapters` adapters; `waits`: its requests' queue waits."""
        with self._lock:
            self.batches += 1
            self.batch_rows.observe(rows)
            self.batch_adapters.observe(adapters)
            for w in waits:
                self.queue_wait.observe(w)

    def render(self, served: int) -> str:
        n = PREFIX
        with self._lock:
            out = [f"# HELP {n}requests_total Prediction requests answered, by adapter ('-': not a served one).",
                   f"# TYPE {n}requests_total counter"]
            out += [f"{n}requests_total{_labels(k)} {v}" for k, v in sorted(self.requests.items())]
            out += [f"# HELP {n}errors_total Prediction requests answered with an error, by adapter and status.",
                    f"# TYPE {n}errors_total counter"]
            out += [f"{n}errors_total{_labels(k)} {v}" for k, v in sorted(self.errors.items())]
            out += [f"# HELP {n}texts_total Texts (or pairs) answered, by adapter.", f"# TYPE {n}texts_total counter"]
            out += [f"{n}texts_total{_labels(k)} {v}" for k, v in sorted(self.texts.items())]
            out += [f"# HELP {n}batches_total Forward passes run.", f"# TYPE {n}batches_total counter",
                    f"{n}batches_total {self.batches}"]
            for name, h, what in (("batch_rows", self.batch_rows, "Examples per forward pass."),
                                  ("batch_adapters", self.batch_adapters, "Distinct adapters per forward pass."),
                                  ("queue_wait_seconds", self.queue_wait,
                                   "Time from a request's arrival in the queue to the start of its first pass."),
                                  ("request_latency_seconds", self.latency,
                                   "Time from a prediction request's arrival to its answer.")):
                out += [f"# HELP {n}{name} {what}", f"# TYPE {n}{name} histogram"] + h.lines(n + name)
            out += [f"# HELP {n}queue_texts Texts accepted and not yet answered.", f"# TYPE {n}queue_texts gauge",
                    f"{n}queue_texts {self.queued}",
                    f"# HELP {n}adapters Adapters served.", f"# TYPE {n}adapters gauge", f"{n}adapters {served}"]
        return "\n".join(out) + "\n"
