"""The engine: loads runners in the background and drives their steps from one loop task.

The loop picks the next runner with work (round robin), asks its scheduler for a plan, runs the step on
a single worker thread (so the event loop never waits on the model), commits the outputs and hands each
sequence's tokens to its own output slot, a `Stream`. Clients of the engine (channels) never see batches.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from streamplex.server.engine.batch import BatchRunner, ItemQueue, Job
from streamplex.server.engine.metrics import Histograms, StepStats
from streamplex.server.engine.runner import Runner, RunnerSpec
from streamplex.server.engine.scheduler import AdmissionError, Output, RoundRobin, Scheduler, Seq

log = logging.getLogger(__name__)

State = Literal["loading", "ready", "failed"]


class EngineError(Exception):
    """A request the engine cannot take: `code` is `unavailable` (not loaded, failed, queue full) or `invalid`."""

    def __init__(self, code: Literal["unavailable", "invalid"], message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Limits:
    """Scheduler limits, the same for every runner."""

    max_batch: int = 32
    step_tokens: int = 512
    prefill_chunk: int = 256
    kv_cache_bytes: int = 2 << 30
    max_waiting: int = 1024
    batch_items: int = 128
    max_waiting_items: int = 65536

    def __post_init__(self) -> None:
        if self.step_tokens < self.max_batch + self.prefill_chunk:
            raise ValueError(f"step_tokens ({self.step_tokens}) must be at least max_batch + prefill_chunk ({self.max_batch + self.prefill_chunk})")


@dataclass(slots=True)
class Update:
    """What arrived for one stream since the last `Stream.next()`."""

    tokens: list[int] = field(default_factory=list)
    queued: int | None = None
    finish: str | None = None


class Stream:
    """One request's output slot. Await `next()` until it returns None; leaving `async with` cancels it."""

    def __init__(self, engine: Engine, seq_id: int, runner: str, prompt_tokens: int) -> None:
        self.engine = engine
        self.id = seq_id
        self.runner = runner
        self._stats = engine.stats[runner]
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.submitted = time.perf_counter()
        self.admitted: float | None = None  # when its first step began (the end of its wait in the queue)
        self.first_token: float | None = None
        self._last_token = 0.0
        self.finished: float | None = None
        self.finish_reason: str | None = None
        self.position: int | None = None
        self._pending = Update()
        self._closed = False
        self._ready = asyncio.Event()

    def _deliver(self, token: int | None = None, queued: int | None = None, finish: str | None = None) -> None:
        now = time.perf_counter()
        if token is not None:
            self._pending.tokens.append(token)
            self.completion_tokens += 1
            if self.first_token is None:
                self.first_token = now
                self._stats.first_token.observe(now - self.submitted)
            else:
                self._stats.inter_token.observe(now - self._last_token)
            self._last_token = now
        if queued is not None:
            self._pending.queued = queued
        if finish is not None:
            self._pending.finish = self.finish_reason = finish
            self.finished = now
        self._ready.set()

    async def next(self) -> Update | None:
        """Wait for tokens, a queue position or the finish; None once the finish has been returned."""
        while not self._closed:
            update = self._pending
            if update.tokens or update.queued is not None or update.finish is not None:
                self._pending = Update()
                self._closed = update.finish is not None
                return update
            self._ready.clear()
            await self._ready.wait()
        return None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating now; the sequence leaves the batch at the next step. No-op once finished."""
        if not self.done:
            self.engine._cancel(self)

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class Engine:
    """Owns the runners, their schedulers and the loop task. Build one with `build_engine(settings)`."""

    def __init__(self, specs: Sequence[RunnerSpec], limits: Limits = Limits()) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate model names: {names}")
        self.specs = {s.name: s for s in specs}
        self.limits = limits
        self.runners: dict[str, Runner | BatchRunner] = {}
        self.schedulers: dict[str, Scheduler] = {}
        self.queues: dict[str, ItemQueue] = {}
        self._jobs_in_step: list[Job] = []
        self.histograms = Histograms()
        self.stats = {s.name: StepStats(s.family, s.model, self.histograms) for s in specs}
        self.errors: dict[str, str] = {}
        self._streams: dict[int, Stream] = {}
        self._ids = itertools.count(1)
        self._rr = RoundRobin()
        self._wake = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    # lifecycle

    async def start(self) -> None:
        """Start the loop task and begin loading every runner in the background."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self._tasks = [asyncio.create_task(self._loop(), name="engine-loop"), asyncio.create_task(self._load_all(), name="engine-load")]

    async def stop(self) -> None:
        """Stop stepping, end every stream with finish `cancelled`, and release the worker thread."""
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, wait=True)
            self._executor = None
        for stream in list(self._streams.values()):
            stream._deliver(finish="cancelled")
        self._streams.clear()
        for job in [*self._jobs_in_step, *(j for queue in self.queues.values() for j in queue.abort())]:
            job._fail("the engine has stopped")
        self.schedulers.clear()
        self.queues.clear()
        for runner in self.runners.values():
            runner.reset()
        self.runners.clear()

    async def _load_all(self) -> None:
        for name, spec in self.specs.items():
            started = time.perf_counter()
            try:
                runner = await asyncio.to_thread(spec.create)
                await asyncio.to_thread(runner.load)
            except Exception as exc:
                log.exception("loading %s failed", name)
                self.errors[name] = f"{type(exc).__name__}: {exc}"
                continue
            self._install(runner)
            log.info("%s ready in %.1f s (%s)", name, time.perf_counter() - started, runner.describe())

    def _install(self, runner: Runner | BatchRunner) -> None:
        if isinstance(runner, BatchRunner):
            self.queues[runner.name] = ItemQueue(self.limits.batch_items, self.limits.max_waiting_items)
            self.runners[runner.name] = runner
            self._wake.set()
            return
        per_token = runner.kv_token_bytes()
        budget = self.limits.kv_cache_bytes // per_token if per_token else sys.maxsize
        self.schedulers[runner.name] = Scheduler(
            max_batch=self.limits.max_batch,
            step_tokens=self.limits.step_tokens,
            prefill_chunk=self.limits.prefill_chunk,
            kv_budget=budget,
            kv_cost=runner.kv_cost,
            max_waiting=self.limits.max_waiting,
        )
        self.runners[runner.name] = runner
        self._wake.set()

    # what channels ask

    def models(self, family: str) -> list[str]:
        """Model names of a family, the default first."""
        return [s.model for s in self.specs.values() if s.family == family]

    def state(self, name: str) -> tuple[State, str | None]:
        """(`loading` | `ready` | `failed`, reason) of one runner, by `family/model` name."""
        if self._stopped:
            return "failed", "the engine has stopped"
        if name in self.errors:
            return "failed", self.errors[name]
        if name in self.schedulers or name in self.queues:
            return "ready", None
        return "loading", None

    def family_state(self, family: str) -> tuple[State, str | None]:
        """The state of a family's default model (what /ready and the channel status report)."""
        models = self.models(family)
        if not models:
            return "failed", f"no {family} model is configured"
        return self.state(f"{family}/{models[0]}")

    def ready(self, family: str = "chat") -> bool:
        return self.family_state(family)[0] == "ready"

    def runner(self, family: str, model: str | None = None) -> Runner | BatchRunner:
        """The loaded runner for `model` (default: the family's first); EngineError if unknown or not ready."""
        models = self.models(family)
        model = model or (models[0] if models else None)
        if model not in models:
            raise EngineError("invalid", f"unknown {family} model {model!r}; available: {', '.join(models) or 'none'}")
        name = f"{family}/{model}"
        state, reason = self.state(name)
        if state != "ready":
            raise EngineError("unavailable", f"{name} is {state}" + (f": {reason}" if reason else ""))
        return self.runners[name]

    def submit(self, runner: str, prompt_len: int, max_new: int, payload: Any, priority: int = 0) -> Stream:
        """Queue a sequence on a ready runner and return its output slot; a higher `priority` is admitted first, in a step of its own."""
        scheduler = self.schedulers.get(runner)
        if scheduler is None:
            raise EngineError("unavailable", f"{runner} is not ready")
        seq = Seq(next(self._ids), prompt_len, max_new, payload, priority)
        try:
            scheduler.add(seq)
        except AdmissionError as exc:
            raise EngineError("unavailable" if exc.retryable else "invalid", str(exc)) from None
        stream = Stream(self, seq.id, runner, prompt_len)
        self._streams[seq.id] = stream
        self._wake.set()
        return stream

    def submit_items(self, runner: str, items: Sequence[Any]) -> Job:
        """Queue one-shot items on a ready batch runner (e.g. sentences to embed); `await job.wait()` for their results."""
        queue = self.queues.get(runner)
        if queue is None:
            raise EngineError("unavailable", f"{runner} is not ready")
        if len(items) > queue.max_waiting:
            raise EngineError("invalid", f"{len(items)} items exceed the queue's limit of {queue.max_waiting}")
        job = Job(items)
        try:
            queue.add(job)
        except ValueError as exc:
            raise EngineError("unavailable", str(exc)) from None
        self._wake.set()
        return job

    def _cancel(self, stream: Stream) -> None:
        scheduler = self.schedulers.get(stream.runner)
        if scheduler is not None:
            scheduler.cancel(stream.id)
        self._streams.pop(stream.id, None)
        stream._deliver(finish="cancelled")
        self._wake.set()

    def metrics(self) -> dict[str, Any]:
        """A plain snapshot: per runner its state, last step, totals, tokens/s, queue and KV use."""
        now = time.monotonic()
        runners = {}
        for name, stats in self.stats.items():
            state, reason = self.state(name)
            entry: dict[str, Any] = {"state": state, **({"error": reason} if reason else {}), **stats.snapshot(now)}
            scheduler, runner, queue = self.schedulers.get(name), self.runners.get(name), self.queues.get(name)
            if queue is not None and runner is not None:
                entry |= {
                    "waiting_items": len(queue.pending),
                    "items_total": queue.items_total,
                    "jobs_total": queue.jobs_total,
                    **runner.describe(),
                    **runner.stats(),
                }
            if scheduler is not None and runner is not None:
                entry |= {
                    "running": len(scheduler.running),
                    "waiting": len(scheduler.waiting),
                    "kv_reserved_tokens": scheduler.reserved(),
                    "kv_budget_tokens": scheduler.kv_budget,
                    **runner.describe(),
                    **runner.stats(),
                }
            runners[name] = entry
        return {"streams": len(self._streams), "runners": runners}

    # the loop

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            names = [*self.schedulers, *self.queues]
            index = self._rr.pick([self.schedulers[n].has_work() if n in self.schedulers else self.queues[n].has_work() for n in names])
            if index is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            name = names[index]
            if name in self.queues:
                await self._step_items(name)
                continue
            runner, scheduler = self.runners[name], self.schedulers[name]
            assert isinstance(runner, Runner)
            plan = scheduler.plan()
            self._report_positions(scheduler)
            started = time.perf_counter()
            for seq_id in plan.admit:
                if (stream := self._streams.get(seq_id)) is not None:
                    stream.admitted = started
                    self.stats[name].queue_wait.observe(started - stream.submitted)
            try:
                outputs = await loop.run_in_executor(self._executor, runner.execute, plan)
            except Exception:
                log.exception("step of %s failed; its running requests end with an error", name)
                await loop.run_in_executor(self._executor, runner.reset)
                for seq in scheduler.abort_running():
                    self._dispatch(Output(seq.id, done="error"))
                continue
            elapsed = time.perf_counter() - started
            generated = 0
            for _, out in scheduler.commit(plan, outputs):
                generated += out.token is not None
                self._dispatch(out)
            if plan.tokens:
                batch = len(plan.decode) + len(plan.prefill)
                self.stats[name].record(time.monotonic(), elapsed, batch, plan.tokens - len(plan.decode), generated)

    async def _step_items(self, name: str) -> None:
        """One step of a batch runner: up to `batch_items` queued items of any jobs in one call."""
        runner, queue = self.runners[name], self.queues[name]
        assert isinstance(runner, BatchRunner)
        batch = queue.take()
        self._jobs_in_step = list(dict.fromkeys(job for job, _ in batch))
        started = time.perf_counter()
        for job in self._jobs_in_step:
            if not job.started:
                job.started = True
                self.stats[name].queue_wait.observe(started - job.submitted)
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, runner.run, [job.items[i] for job, i in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{name} returned {len(results)} results for {len(batch)} items")
        except Exception as exc:
            log.exception("step of %s failed; its jobs end with an error", name)
            for job in self._jobs_in_step:
                job._fail(f"{type(exc).__name__}: {exc}")
            self._jobs_in_step = []
            return
        elapsed = time.perf_counter() - started
        self._jobs_in_step = []
        for (job, i), result in zip(batch, results, strict=True):
            if not job.done:
                job._deliver(i, result)
        self.stats[name].record(time.monotonic(), elapsed, len(batch), 0, 0)

    def _dispatch(self, out: Output) -> None:
        """Hand one output to its stream; a finished stream leaves the table."""
        stream = self._streams.get(out.seq_id)
        if stream is None:
            return
        if out.done is not None:
            del self._streams[out.seq_id]
        stream._deliver(token=out.token, finish=out.done)

    def _report_positions(self, scheduler: Scheduler) -> None:
        for seq_id, position in scheduler.positions().items():
            stream = self._streams.get(seq_id)
            if stream is not None and stream.position != position:
                stream.position = position
                stream._deliver(queued=position)
