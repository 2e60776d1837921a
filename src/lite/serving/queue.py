"""The decode queue behind ``lite serve``: one worker thread, a fair FIFO, cancellation per request.

* The model is only read: each job carries its own :class:`ExitPolicy` and :class:`GenerationSettings`.
* One thread runs :func:`lite.decoding.generate` for one job at a time (batch 1, CPU), in arrival order.
* Tokens go from the worker to the request's coroutine through an ``asyncio.Queue`` fed with
  ``loop.call_soon_threadsafe``, so the event loop never blocks on torch.
* A client that goes away sets its job's cancel flag: a waiting job is dropped at once (its slot is free
  again), a running one stops at its next ``on_token`` call.
* At most ``max_queue`` jobs wait behind the running one; :meth:`DecodeWorker.submit` refuses more.
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


class GenerationCancelled(Exception):
    """Raised inside ``on_token`` when the client went away; ends :func:`generate` early."""


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


GenerateFn = Callable[..., GenerationResult]


class DecodeWorker:
    """One thread that decodes queued jobs one at a time, in arrival order.

    Args:
        lm: the loaded model (read only).
        max_queue: how many jobs may wait behind the running one; more raise :class:`QueueFull`.
        generate_fn: the decoding entry point, ``lite.decoding.generate`` by default (tests may wrap it).
    """

    def __init__(self, lm: LiteModel, max_queue: int = 16, generate_fn: GenerateFn | None = None) -> None:
        if max_queue < 0:
            raise LiteError(f"--max-queue must be >= 0, got {max_queue}")
        self.lm = lm
        self.max_queue = max_queue
        self._generate = generate_fn
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self._current: Job | None = None
        self.counts = {"served": 0, "cancelled": 0, "failed": 0, "rejected": 0}
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
        """The client is gone: skip the job if it has not started, stop it at its next token if it has.
        Idempotent; a no-op for a finished job."""
        job.cancel.set()
        with self._lock:
            if job.state == "waiting":
                job.state = "cancelled"
                self.waiting -= 1
                self.counts["cancelled"] += 1

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker: the running job ends at its next token, waiting jobs are cancelled."""
        with self._lock:
            if self._current is not None:
                self._current.cancel.set()
        self._queue.put(None)
        self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"waiting": self.waiting, "running": self.running, "max_queue": self.max_queue, **self.counts}

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                self._drain()
                return
            with self._lock:
                if job.state == "cancelled":
                    continue
                job.state = "running"
                self.waiting -= 1
                self.running = 1
                self._current = job
            try:
                result = self._run(job)
                outcome = ("done", result)
            except GenerationCancelled:
                outcome = ("cancelled", None)
            except Exception as exc:  # reported to this client only; the worker keeps serving
                outcome = ("error", exc)
            with self._lock:
                job.state = "finished"
                self.running = 0
                self._current = None
                key = {"done": "served", "cancelled": "cancelled", "error": "failed"}[outcome[0]]
                self.counts[key] += 1
            job.deliver(*outcome)

    def _run(self, job: Job) -> GenerationResult:
        def on_token(record: TokenRecord) -> None:
            if job.cancel.is_set():
                raise GenerationCancelled()
            if job.stream:
                job.deliver("token", record)

        if job.cancel.is_set():
            raise GenerationCancelled()
        generate = self._generate or decoding.generate  # looked up per call so tests can patch it
        return generate(self.lm, job.prompt_ids, job.policy, job.settings, on_token=on_token)

    def _drain(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and job.state == "waiting":
                job.state = "cancelled"
                job.deliver("cancelled", None)
