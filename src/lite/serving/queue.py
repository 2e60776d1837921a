"""The decode loop behind ``lite serve``: continuous batching with early exit, a fair FIFO, cancellation.

* The model is only read: each job carries its own :class:`ExitPolicy` and :class:`GenerationSettings`.
* One thread decodes. Jobs wait in a FIFO; at every token boundary, waiting jobs join the running batch
  while it has fewer than ``max_batch`` rows, and finished or cancelled rows leave it. Rows that share an
  exit policy (a frozen, hashable :class:`lite.decoding.ExitPolicy`) and K/V strategy decode together in
  one :class:`lite.decoding.Decoder` (a *lane*) of at most :func:`lite.decoding.batch_limit` rows, each row
  still leaving the network at its own layer; each lane takes one step per round (for ``speculative``, one
  sequence per lane, one draft/verify round per step).
* Tokens go from the worker to the request's coroutine through an ``asyncio.Queue`` fed with
  ``loop.call_soon_threadsafe``, so the event loop never blocks on torch.
* A client that goes away sets its job's cancel flag: a waiting job is dropped at once (its place in the
  queue is free again), a running one leaves the batch at the next token boundary.
* At most ``max_queue`` jobs wait while the batch is full; :meth:`DecodeWorker.submit` refuses more.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import decoding
from ..decoding import ExitPolicy, GenerationResult, GenerationSettings, TokenRecord
from ..errors import LiteError
from ..model.adapter import LiteModel


class QueueFull(Exception):
    """More than ``max_queue`` requests are already waiting."""


@dataclass
class Job:
    """One request's decoding work and its channel back to the event loop.

    ``events`` receives ``("token", TokenRecord)`` per token when ``stream`` is set, then exactly one of
    ``("done", GenerationResult)``, ``("error", Exception)`` or ``("cancelled", None)``.
    """

    prompt_ids: list[int]
    policy: ExitPolicy
    settings: GenerationSettings
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    state: str = "waiting"  # waiting -> running -> finished, or waiting -> cancelled

    def deliver(self, kind: str, payload: Any) -> None:
        """Thread-safe: hand an event to the request's coroutine (dropped if the loop is gone)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # event loop closed: the server is shutting down
            pass


class _Lane:
    """Rows decoding under one exit policy and K/V strategy: one :class:`lite.decoding.Decoder` (the
    speculative one for ``speculative``) of at most ``capacity`` rows."""

    def __init__(self, lm: LiteModel, policy: ExitPolicy, kv: str, max_batch: int, invariant: bool) -> None:
        self.decoder = decoding.open_decoder(lm, policy, kv, invariant=invariant)
        self.capacity = decoding.batch_limit(policy, max_batch)
        self.jobs: dict[int, Job] = {}

    def add(self, jobs: list[Job]) -> None:
        rows = self.decoder.add_many([j.prompt_ids for j in jobs], [j.settings for j in jobs])
        self.jobs.update(zip(rows, jobs))

    def step(self) -> list[tuple[Job, TokenRecord, GenerationResult | None]]:
        """One step (one draft/verify round for speculative) for every row: (job, record, result when done)."""
        out = []
        for r, record, finished in self.decoder.step():
            job = self.jobs[r]
            result = None
            if finished:
                result = self.decoder.result(r)
                self.drop(job)
            out.append((job, record, result))
        return out

    def drop(self, job: Job) -> None:
        """Take ``job`` out of the lane (finished, or cancelled: it stops at once)."""
        for r, j in list(self.jobs.items()):
            if j is job:
                del self.jobs[r]
                self.decoder.release(r)

    @property
    def size(self) -> int:
        return len(self.jobs)

    @property
    def room(self) -> int:
        return self.capacity - len(self.jobs)


def lane_key(policy: ExitPolicy, kv: str) -> tuple:
    """Jobs with equal keys may decode in one batch: the same policy (every field: it is frozen and
    hashable) and K/V strategy."""
    return (policy, kv)


class DecodeWorker:
    """One thread that decodes every running job, continuously batched; jobs join in arrival order.

    Args:
        lm: the loaded model (read only).
        max_queue: how many jobs may wait while the batch is full; more raise :class:`QueueFull`.
        max_batch: how many sequences decode at once (``--max-batch``); 1 decodes one at a time.
        on_step: called after every round of steps (tests slow the worker down with it).
        invariant: batch-invariant lanes (:class:`lite.decoding.Decoder` ``invariant``): each request is
            computed exactly as it is alone, so its greedy tokens do not depend on the load.
    """

    def __init__(self, lm: LiteModel, max_queue: int = 16, max_batch: int = 8,
                 on_step: Callable[[], None] | None = None, invariant: bool = True) -> None:
        if max_queue < 0:
            raise LiteError(f"--max-queue must be >= 0, got {max_queue}")
        if max_batch < 1:
            raise LiteError(f"--max-batch must be >= 1, got {max_batch}")
        self.lm = lm
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.invariant = invariant
        self._on_step = on_step
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self._lanes: list[tuple[tuple, _Lane]] = []  # (lane_key, lane), in the order they opened
        self._closing = False
        self.counts = {"served": 0, "cancelled": 0, "failed": 0, "rejected": 0, "peak_batch": 0}
        self._thread = threading.Thread(target=self._loop, name="lite-decode", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job`` (FIFO); raises :class:`QueueFull` when ``max_queue`` jobs already wait."""
        with self._lock:
            if self.waiting >= self.max_queue and (self.running or self.waiting):
                self.counts["rejected"] += 1
                raise QueueFull(f"{self.waiting} requests are waiting (--max-queue {self.max_queue})")
            self.waiting += 1
        self._queue.put(job)

    def cancel(self, job: Job) -> None:
        """The client is gone: skip the job if it has not started, take it out of the batch at the next
        token boundary if it has. Idempotent; a no-op for a finished job."""
        job.cancel.set()
        with self._lock:
            if job.state == "waiting":
                job.state = "cancelled"
                self.waiting -= 1
                self.counts["cancelled"] += 1

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker: running jobs end at the next token boundary, waiting jobs are cancelled."""
        self._closing = True
        self._queue.put(None)
        self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"waiting": self.waiting, "running": self.running, "max_queue": self.max_queue,
                    "max_batch": self.max_batch, "batch_invariant": self.invariant, **self.counts}

    # ------------------------------------------------------------------ the decode thread
    def _loop(self) -> None:
        while True:
            self._admit()
            if self._closing:
                break
            if not self.running:
                continue
            with self._lock:
                self.counts["peak_batch"] = max(self.counts["peak_batch"], self.running)
            for key, lane in list(self._lanes):
                self._step(lane)
            self._lanes = [(key, lane) for key, lane in self._lanes if lane.size]
            if self._on_step is not None:
                self._on_step()
        for _, lane in self._lanes:
            for job in list(lane.jobs.values()):
                lane.drop(job)
                self._finish(job, "cancelled", None)
        self._drain()

    def _admit(self) -> None:
        """Move waiting jobs into the batch while it has room (blocks while nothing runs)."""
        joining: dict[tuple, list[Job]] = {}
        while self.running + sum(map(len, joining.values())) < self.max_batch:
            idle = not self.running and not joining
            try:
                job = self._queue.get(block=idle)
            except queue.Empty:
                break
            if job is None:
                self._closing = True
                break
            with self._lock:
                if job.state == "cancelled":
                    continue
                job.state = "running"
                self.waiting -= 1
            joining.setdefault(lane_key(job.policy, job.settings.kv), []).append(job)
        for key, jobs in joining.items():
            while jobs:  # into the open lanes of this policy with room, then into new ones
                lane = next((ln for k, ln in self._lanes if k == key and ln.room > 0), None)
                if lane is None:
                    try:
                        lane = _Lane(self.lm, jobs[0].policy, jobs[0].settings.kv, self.max_batch, self.invariant)
                    except Exception as exc:  # reported to these clients only; the worker keeps serving
                        self._fail(jobs, exc)
                        break
                    self._lanes.append((key, lane))
                group, jobs = jobs[:lane.room], jobs[lane.room:]
                try:
                    lane.add(group)
                except Exception as exc:
                    self._fail(group, exc)
                    continue
                for job in group:
                    self._start(job)

    def _fail(self, jobs: list[Job], exc: Exception) -> None:
        for job in jobs:
            self._start(job)
            self._finish(job, "error", exc)

    def _step(self, lane: _Lane) -> None:
        for job in [j for j in lane.jobs.values() if j.cancel.is_set()]:  # left at this token boundary
            lane.drop(job)
            self._finish(job, "cancelled", None)
        if not lane.size:
            return
        try:
            events = lane.step()
        except Exception as exc:  # a failed step fails its lane's requests only
            for job in list(lane.jobs.values()):
                lane.drop(job)
                self._finish(job, "error", exc)
            return
        for job, record, result in events:
            if record is not None and job.stream:
                job.deliver("token", record)
            if result is not None:
                self._finish(job, "done", result)

    def _start(self, job: Job) -> None:
        with self._lock:
            self.running += 1

    def _finish(self, job: Job, kind: str, payload: Any) -> None:
        with self._lock:
            job.state = "finished"
            self.running -= 1
            self.counts[{"done": "served", "cancelled": "cancelled", "error": "failed"}[kind]] += 1
        job.deliver(kind, payload)

    def _drain(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and job.state == "waiting":
                job.state = "cancelled"
                job.deliver("cancelled", None)
