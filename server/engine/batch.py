"""One-shot batched work beside the token scheduler: runners that map each item to one result (embeddings).

A `BatchRunner` keeps no state between steps. Clients submit a `Job` (a list of items, e.g. the sentences of
one document); the `ItemQueue` hands the runner up to `max_items` items per step, oldest first and across
all jobs, so items of many streams share one forward pass. A job's results come back in its items' order
once the last of them is done. No torch here.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from typing import Any


class StepFailed(Exception):
    """A job cannot complete: a step that ran some of its items raised (the server log has the traceback), or the engine stopped."""


class BatchRunner(ABC):
    """A model of one-shot items. `name` is unique across the engine, e.g. `embedding/all-minilm-l6-v2`."""

    name: str
    family: str

    @abstractmethod
    def load(self) -> None:
        """Load the model (blocking; called once, off the event loop)."""

    @abstractmethod
    def run(self, items: Sequence[Any]) -> list[Any]:
        """One result per item, in order (called from the engine's worker thread only)."""

    def reset(self) -> None:
        """Drop any transient state after a failed step (default: none kept)."""

    def describe(self) -> dict[str, Any]:
        """Static facts for metrics and logs (device, dtype, model)."""
        return {}

    def stats(self) -> dict[str, Any]:
        """Live figures for metrics; read from the event loop thread."""
        return {}


class Job:
    """One request's items and their results. `await job.wait()` returns the results; `cancel()` drops what is queued."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = list(items)
        self.submitted = time.perf_counter()
        self.started = False  # an engine step has taken one of its items
        self.results: list[Any] = [None] * len(self.items)
        self.left = len(self.items)
        self.cancelled = False
        self.error: str | None = None
        self._done = asyncio.Event()
        if not self.items:
            self._done.set()

    def _deliver(self, index: int, result: Any) -> None:
        self.results[index] = result
        self.left -= 1
        if self.left == 0:
            self._done.set()

    def _fail(self, message: str) -> None:
        self.error = message
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def wait(self) -> list[Any]:
        """The results in item order; raises StepFailed if a step failed, or CancelledError if cancelled."""
        await self._done.wait()
        if self.error is not None:
            raise StepFailed(self.error)
        if self.cancelled:
            raise asyncio.CancelledError
        return self.results

    def cancel(self) -> None:
        """Drop the job's queued items (items already in a running step finish and are discarded)."""
        if not self.done:
            self.cancelled = True
            self._done.set()

    async def __aenter__(self) -> Job:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class ItemQueue:
    """FIFO of (job, index) across jobs; each step takes up to `max_items` of them. Cancelled jobs' items are skipped."""

    def __init__(self, max_items: int, max_waiting: int) -> None:
        if min(max_items, max_waiting) < 1:
            raise ValueError("max_items and max_waiting must be positive")
        self.max_items = max_items
        self.max_waiting = max_waiting
        self.pending: deque[tuple[Job, int]] = deque()
        self.items_total = 0
        self.jobs_total = 0

    def add(self, job: Job) -> None:
        """Queue every item of `job`; ValueError when the queue would hold more than `max_waiting` items."""
        self._drop_cancelled()
        if len(self.pending) + len(job.items) > self.max_waiting:
            raise ValueError(f"{len(self.pending)} items are already queued (limit {self.max_waiting})")
        self.pending.extend((job, i) for i in range(len(job.items)))
        self.jobs_total += 1

    def _drop_cancelled(self) -> None:
        if any(job.done for job, _ in self.pending):
            self.pending = deque((job, i) for job, i in self.pending if not job.done)

    def has_work(self) -> bool:
        self._drop_cancelled()
        return bool(self.pending)

    def take(self) -> list[tuple[Job, int]]:
        """The next step's items, oldest first."""
        self._drop_cancelled()
        batch = [self.pending.popleft() for _ in range(min(self.max_items, len(self.pending)))]
        self.items_total += len(batch)
        return batch

    def abort(self) -> list[Job]:
        """Every job with queued items (at engine stop)."""
        jobs = list(dict.fromkeys(job for job, _ in self.pending))
        self.pending.clear()
        return jobs
