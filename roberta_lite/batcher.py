"""Dynamic batching for the server: one worker thread owns the model and the tokenizer and runs every forward
pass; the HTTP handlers only queue work and wait for its future.

What the worker does, over and over:
  1. take the oldest job; a prediction job gathers the jobs that arrive within `window` seconds of its arrival
     (those already waiting join at once) until `max_tokens` real tokens or `max_rows` examples are gathered;
  2. sort the gathered examples by length and cut them into passes of at most `max_tokens` padded tokens and
     `max_rows` rows, so a pass mixes adapters (one name per row) but little padding;
  3. run `model(ids, mask, adapter=[name per row])` per pass; each row's logits, sliced to its own head's width,
     become the job's outputs (predict's result objects), and each job's future gets exactly its own as soon as
     its last row has run.
Token-classification adapters (a label per token) answer with entities, as predict does. Their texts are
tokenized with character offsets, and their rows run in passes of their own: one pass cannot mix token and
sentence heads (model.RoBERTa.labels_every_token).
A command (adding or removing an adapter) is a job too: it runs alone, between passes, in queue order, so the
predictions queued before it see the model as it was. With `batching=False` each pass is one request.

The queue is bounded by the texts waiting (`max_queue`): `submit` raises QueueFull rather than grow.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from roberta_lite.data import PAD_MULTIPLE, TOKEN_TASK, collate
from roberta_lite.predict import head_output, token_output
from roberta_lite.serve_metrics import Metrics


class QueueFull(RuntimeError):
    """More texts are waiting than the queue holds; the caller should retry later."""


class AdapterGone(KeyError):
    """The request's adapter was removed after the request was accepted."""


@dataclass
class _Predict:
    adapter: str
    inputs: list[str | tuple[str, str]]
    future: Future
    arrived: float = field(default_factory=time.perf_counter)
    seqs: list[list[int]] = field(default_factory=list)  # token ids, filled by the worker
    encoded: list = field(default_factory=list)  # a token adapter's Encoded (ids, word ids, offsets) per text


@dataclass
class _Command:
    fn: Callable
    future: Future


_STOP = object()
_WAKE = object()  # wakes a worker waiting out a window after drain()


class Batcher:
    def __init__(self, model, tokenizer, max_length: int, metrics: Metrics, *, window: float = 0.005,
                 max_tokens: int = 8192, max_rows: int = 64, max_queue: int = 1024, batching: bool = True):
        for what, v, low in (("window", window, 0), ("max_tokens", max_tokens, 1), ("max_rows", max_rows, 1),
                             ("max_queue", max_queue, 1)):
            if v < low:
                raise ValueError(f"{what} {v}: must be at least {low}")
        self.model, self.tokenizer, self.max_length, self.metrics = model, tokenizer, max_length, metrics
        self.window, self.max_tokens, self.max_rows, self.max_queue = window, max_tokens, max_rows, max_queue
        self.batching = batching
        self.device = next(model.parameters()).device
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0  # texts submitted and not yet answered
        self._draining = threading.Event()  # set: no more waiting for company, run what is queued
        self._thread = threading.Thread(target=self._run, name="roberta_lite-batcher", daemon=True)

    # ------------------------------------------------------------------ the handlers' side (any thread)

    def start(self):
        self._thread.start()

    def stop(self):
        """Answer everything queued so far, then end the worker."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def drain(self):
        """Stop waiting out batching windows (the server is shutting down): what is queued runs now."""
        self._draining.set()
        self._queue.put(_WAKE)

    def submit(self, adapter: str, inputs: list[str | tuple[str, str]]) -> Future:
        """Queue one request; its future's result is one output object per input, in order."""
        with self._lock:
            if self._waiting + len(inputs) > self.max_queue:
                raise QueueFull(f"the queue is full ({self._waiting} texts waiting, room for {self.max_queue})")
            self._waiting += len(inputs)
            self.metrics.queued = self._waiting
        job = _Predict(adapter, inputs, Future())
        self._queue.put(job)
        return job.future

    def call(self, fn: Callable) -> Future:
        """Run fn(model) on the worker between passes, after every job queued before it."""
        cmd = _Command(fn, Future())
        self._queue.put(cmd)
        return cmd.future

    # ------------------------------------------------------------------ the worker thread

    def _run(self):
        carry = None
        while True:
            item = carry if carry is not None else self._queue.get()
            carry = None
            if item is _STOP:
                return
            if item is _WAKE:
                continue
            if isinstance(item, _Command):
                self._command(item)
                continue
            jobs, carry = self._gather(item)
            self._answer(jobs)

    def _command(self, cmd: _Command):
        try:
            cmd.future.set_result(cmd.fn(self.model))
        except BaseException as e:  # the caller turns it into an HTTP answer; the worker goes on
            cmd.future.set_exception(e)

    def _gather(self, first: _Predict):
        """The jobs of one round: `first`, and while batching, those arriving within the window or the budget.
        Returns (jobs, the next item if one was taken that does not belong here: a command or the stop)."""
        self._tokenize(first)
        jobs = [first]
        if not self.batching:
            return jobs, None
        tokens, rows = sum(map(len, first.seqs)), len(first.seqs)
        deadline = first.arrived + self.window
        while tokens < self.max_tokens and rows < self.max_rows:
            left = 0 if self._draining.is_set() else deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _WAKE:
                continue
            if not isinstance(item, _Predict):
                return jobs, item
            self._tokenize(item)
            jobs.append(item)
            tokens += sum(map(len, item.seqs))
            rows += len(item.seqs)
        return jobs, None

    def _tokenize(self, job: _Predict):
        """Ids for each input, truncated to max_length as predict does; singles and pairs encoded apart; a token
        adapter's texts with their offsets (serve.parse_predict lets no pair reach one)."""
        if self._tags(job.adapter) and all(isinstance(x, str) for x in job.inputs):
            job.encoded = self.tokenizer.encode_batch_with_offsets(list(job.inputs), self.max_length)
            job.seqs = [e.ids for e in job.encoded]
            return
        singles = [i for i, x in enumerate(job.inputs) if isinstance(x, str)]
        pairs = [i for i, x in enumerate(job.inputs) if not isinstance(x, str)]
        seqs: list[list[int]] = [[] for _ in job.inputs]
        if singles:
            for i, s in zip(singles, self.tokenizer.encode_batch([job.inputs[i] for i in singles], self.max_length)):
                seqs[i] = s
        if pairs:
            encoded = self.tokenizer.encode_batch([job.inputs[i][0] for i in pairs], self.max_length,
                                                  text_pairs=[job.inputs[i][1] for i in pairs])
            for i, s in zip(pairs, encoded):
                seqs[i] = s
        job.seqs = seqs

    def _passes(self, rows: list[tuple[int, int]], seqs: list[list[list[int]]]) -> list[list[tuple[int, int]]]:
        """Rows (job index, input index) sorted by length, cut so that a pass's padded tokens stay within the
        budget (a row longer than the budget goes alone)."""
        rows = sorted(rows, key=lambda r: len(seqs[r[0]][r[1]]))
        out, cur = [], []
        for r in rows:
            n = len(seqs[r[0]][r[1]])  # the longest so far, as rows come shortest first
            if cur and ((len(cur) + 1) * n > self.max_tokens or len(cur) >= self.max_rows):
                out.append(cur)
                cur = []
            cur.append(r)
        return out + [cur]

    def _answer(self, jobs: list[_Predict]):
        served = set(self.model.adapter_names)
        live = []
        for job in jobs:
            if job.adapter in served and self._tags(job.adapter) and not job.encoded:  # replaced since it was sent
                self._finish(job, exc=ValueError(f"adapter {job.adapter!r} now tags tokens and takes no pairs"))
            elif job.adapter in served:
                live.append(job)
            else:
                self._finish(job, exc=AdapterGone(f"adapter {job.adapter!r} was removed before this request ran"))
        if not live:
            return
        seqs = [j.seqs for j in live]
        rows = [(j, i) for j, job in enumerate(live) for i in range(len(job.inputs))]
        passes = []
        for tags in (False, True):  # sentence heads' rows, then token heads': never in one pass
            kind = [r for r in rows if self._tags(live[r[0]].adapter) == tags]
            passes += [] if not kind else [kind] if not self.batching else self._passes(kind, seqs)
        outputs: list[list[dict | None]] = [[None] * len(job.inputs) for job in live]
        left = [len(job.inputs) for job in live]  # rows still to run, per job: a job is answered when it has none
        waits = [time.perf_counter() - job.arrived for job in live]  # every job of the round starts with pass 1
        try:
            for p in passes:
                names = [live[j].adapter for j, _ in p]
                logits = self._forward([seqs[j][i] for j, i in p], names)
                self.metrics.batch(len(p), len(set(names)), waits)
                waits = []
                for (j, i), row in zip(p, logits):
                    job, head = live[j], self.model.heads[live[j].adapter]
                    outputs[j][i] = token_output(head, row[:len(job.seqs[i])], job.inputs[i], job.encoded[i]) \
                        if job.encoded else head_output(head, row)
                    left[j] -= 1
                    if left[j] == 0:  # rows run shortest first: short requests need not wait for long ones
                        self._finish(live[j], result=outputs[j])
        except Exception as e:  # a failed pass fails its round's unanswered requests, never the worker
            for j, job in enumerate(live):
                if left[j]:
                    self._finish(job, exc=e)

    @torch.inference_mode()
    def _forward(self, seqs: list[list[int]], names: list[str]) -> torch.Tensor:
        ids, mask = collate(seqs, self.tokenizer.pad_id, PAD_MULTIPLE, self.model.config.max_tokens)  # few shapes
        logits = self.model(ids.to(self.device), mask.to(self.device), adapter=names)
        return logits.float().cpu()  # (B, K_max) or (B, T, K_max); narrower heads' -inf columns are sliced off

    def _tags(self, adapter: str) -> bool:
        """Whether the adapter's head labels every token (its results are entities)."""
        return adapter in self.model.heads and self.model.heads[adapter].task == TOKEN_TASK

    def _finish(self, job: _Predict, result=None, exc: BaseException | None = None):
        with self._lock:
            self._waiting -= len(job.inputs)
            self.metrics.queued = self._waiting
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)
