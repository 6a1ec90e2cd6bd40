"""The scheduler and the engine loop with hand-built runner outputs: no torch, no model."""

from __future__ import annotations

import asyncio
import re
import sys

import pytest

from streamplex.server.engine import Engine, EngineError, Limits
from streamplex.server.engine.runner import Runner, RunnerSpec
from streamplex.server.engine.scheduler import AdmissionError, Chunk, Output, RoundRobin, Scheduler, Seq, StepPlan


def make(**kw: int) -> Scheduler:
    return Scheduler(**({"max_batch": 4, "step_tokens": 24, "prefill_chunk": 8, "kv_budget": 1000} | kw))


def step(s: Scheduler, done: dict[int, str] | None = None) -> StepPlan:
    """Plan a step and commit it as a runner would: one token per decode and per finished prompt."""
    plan = s.plan()
    outs = [Output(i, 7, (done or {}).get(i)) for i in plan.decode] + [Output(c.seq_id, 7) for c in plan.prefill if c.last]
    s.commit(plan, outs)
    return plan


def test_prefill_in_fixed_chunks_beside_decode() -> None:
    s = make()
    s.add(Seq(1, prompt_len=5, max_new=10))
    s.add(Seq(2, prompt_len=20, max_new=10))
    first = step(s)
    assert first.prefill == [Chunk(1, 0, 5, True), Chunk(2, 0, 8, False)]
    assert set(first.admit) == {1, 2}
    second = step(s)
    assert second.decode == [1]
    assert second.prefill == [Chunk(2, 8, 8, False)]
    third = step(s)
    assert third.decode == [1] and third.prefill == [Chunk(2, 16, 4, True)]
    assert step(s).decode == [1, 2]


def test_budget_holds_back_prefill_but_never_decode() -> None:
    s = make(max_batch=16, step_tokens=24, prefill_chunk=8)
    for i in range(1, 5):
        s.add(Seq(i, prompt_len=8, max_new=50))
    assert [c.seq_id for c in step(s).prefill] == [1, 2, 3]
    plan = step(s)
    assert plan.decode == [1, 2, 3] and [c.seq_id for c in plan.prefill] == [4]
    assert plan.tokens <= 24


def test_max_batch_and_kv_budget_queue_with_positions() -> None:
    s = make(max_batch=2, kv_budget=100)
    for i in range(1, 5):
        s.add(Seq(i, prompt_len=4, max_new=36))
    step(s)
    assert set(s.running) == {1, 2}
    assert s.positions() == {3: 1, 4: 2}
    s.max_batch = 4
    step(s)
    assert set(s.running) == {1, 2}, "the KV budget (100 tokens, 40 each) holds the queue"
    step(s, done={1: "stop"})
    assert set(s.running) == {2} and s.reserved() == 40
    plan = step(s)
    assert plan.release == [1] and set(plan.admit) == {3}
    assert s.positions() == {4: 1}


def test_too_large_and_queue_full() -> None:
    s = make(kv_budget=100)
    with pytest.raises(AdmissionError) as exc:
        s.add(Seq(1, prompt_len=90, max_new=20))
    assert not exc.value.retryable
    s = make(max_waiting=1)
    s.add(Seq(1, 4, 4))
    with pytest.raises(AdmissionError) as exc:
        s.add(Seq(2, 4, 4))
    assert exc.value.retryable


def test_length_finish_and_release() -> None:
    s = make()
    s.add(Seq(1, prompt_len=4, max_new=2))
    step(s)
    plan = s.plan()
    delivered = s.commit(plan, [Output(1, 9)])
    assert [out.done for _, out in delivered] == ["length"]
    assert s.plan().release == [1] and not s.has_work()


def test_cancel_waiting_and_running() -> None:
    s = make(max_batch=1)
    s.add(Seq(1, 4, 10))
    s.add(Seq(2, 4, 10))
    plan = s.plan()
    assert s.cancel(2) and s.positions() == {}
    assert s.cancel(1) and not s.running
    assert s.commit(plan, [Output(1, 5)]) == [], "outputs of a cancelled sequence are dropped"
    assert s.plan().release == [1]
    assert not s.cancel(1)


def test_priority_is_admitted_first_in_a_step_of_its_own() -> None:
    """A final (priority 1) queued behind two drafts is admitted before them, alone; they follow in the next step, in their order."""
    s = make(max_batch=8)
    s.add(Seq(1, prompt_len=3, max_new=10))
    s.add(Seq(2, prompt_len=3, max_new=10))
    s.add(Seq(3, prompt_len=3, max_new=10, priority=1))
    s.add(Seq(4, prompt_len=3, max_new=10, priority=1))
    assert s.positions() == {3: 1, 4: 2, 1: 3, 2: 4}
    first = step(s)
    assert list(first.admit) == [3, 4] and [c.seq_id for c in first.prefill] == [3, 4]
    second = step(s)
    assert second.decode == [3, 4] and list(second.admit) == [1, 2]
    s.add(Seq(5, prompt_len=3, max_new=10))
    assert list(step(s).admit) == [5]  # equal priorities share a step as before


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        make(max_batch=20, step_tokens=24, prefill_chunk=8)
    with pytest.raises(ValueError):
        Limits(max_batch=64, step_tokens=128, prefill_chunk=128)


def test_round_robin_skips_idle() -> None:
    rr = RoundRobin()
    picks = [rr.pick(work) for work in ([True, True, True], [True, True, True], [True, False, True], [False, False, False], [True, True, False])]
    assert picks == [0, 1, 2, None, 0]


class CountingRunner(Runner):
    """Hand-built outputs: every decode and finished prompt yields token = the step number; fails on demand."""

    family = "test"

    def __init__(self, model: str, log: list[str] | None = None, fail_at: int | None = None) -> None:
        self.name = f"{self.family}/{model}"
        self.steps = 0
        self.fail_at = fail_at
        self.held: set[int] = set()
        self.log = [] if log is None else log

    def load(self) -> None:
        pass

    def reset(self) -> None:
        self.held.clear()

    def execute(self, plan: StepPlan) -> list[Output]:
        self.steps += 1
        self.log.append(self.name)
        if self.steps == self.fail_at:
            raise RuntimeError("boom")
        self.held -= set(plan.release)
        self.held |= set(plan.admit)
        return [Output(i, self.steps) for i in plan.decode] + [Output(c.seq_id, self.steps) for c in plan.prefill if c.last]


async def started(*runners: CountingRunner, **limits: int) -> Engine:
    engine = Engine([RunnerSpec(r.family, r.name.split("/")[1], lambda r=r: r) for r in runners], Limits(**limits))
    await engine.start()
    while not all(engine.state(r.name)[0] == "ready" for r in runners):
        await asyncio.sleep(0.001)
    return engine


async def drain(stream) -> tuple[list[int], str | None]:
    tokens: list[int] = []
    async with stream:
        while (update := await stream.next()) is not None:
            tokens += update.tokens
    return tokens, stream.finish_reason


async def test_loop_interleaves_runners_and_delivers_tokens() -> None:
    log: list[str] = []
    a, b = CountingRunner("a", log), CountingRunner("b", log)
    engine = await started(a, b, max_batch=4, step_tokens=16, prefill_chunk=8)
    try:
        results = await asyncio.gather(
            drain(engine.submit(a.name, 3, 6, None)), drain(engine.submit(a.name, 3, 6, None)), drain(engine.submit(b.name, 3, 6, None))
        )
        assert [len(tokens) for tokens, _ in results] == [6, 6, 6]
        assert all(reason == "length" for _, reason in results)
        assert log[:12] == ["test/a", "test/b"] * 6, "the runners stepped in turn"
        snapshot = engine.metrics()["runners"]["test/a"]
        assert snapshot["generated_tokens_total"] == 12 and snapshot["running"] == 0 and snapshot["kv_budget_tokens"] == sys.maxsize
        with pytest.raises(EngineError, match=re.escape("unknown test model 'gpt-3.5-turbo'; available: a, b")):
            engine.runner("test", "gpt-3.5-turbo")
    finally:
        await engine.stop()


async def test_queued_position_cancel_and_failed_step() -> None:
    r = CountingRunner("a", fail_at=4)
    engine = await started(r, max_batch=1, step_tokens=16, prefill_chunk=8)
    try:
        first = engine.submit(r.name, 3, 100, None)
        second = engine.submit(r.name, 3, 100, None)
        assert (await first.next()).tokens == [1]
        assert (await second.next()).queued == 1
        first.cancel()
        assert first.finish_reason == "cancelled"
        update = await second.next()
        assert update.tokens, "admitted into the freed slot"
        _, reason = await drain(second)
        assert reason == "error" and r.held == set(), "a failed step ends its streams and resets the runner"
        assert engine.metrics()["streams"] == 0
    finally:
        await engine.stop()
