"""A model step that raises: only the sequences in that step end with an error, and the engine loop goes on.

The runner is the real bundled chat runner behind a thin Runner subclass that, once armed, lets its
next step run on the model and then raises (so the model's state has moved and the outputs are lost).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest

from streamplex.channels.chat import ChatChannel
from streamplex.server.auth import Principal
from streamplex.server.broker import MemoryBroker
from streamplex.server.channel import Services
from streamplex.server.config import Settings
from streamplex.server.engine import Engine, GenerationRequest, Limits, SamplingParams, Stream
from streamplex.server.engine.causal_lm import CausalLMRunner
from streamplex.server.engine.runner import Runner, RunnerSpec
from streamplex.server.engine.scheduler import Output, StepPlan
from streamplex.server.hub import Hub
from streamplex.server.logbuffer import RingLogHandler
from streamplex.server.protocol import EndReason, Subscribe
from streamplex.server.session import Session
from streamplex.server.telemetry import Stats
from tests.chatmodel import bundled_runner


class StepFailure(RuntimeError):
    """What the armed runner raises."""


class FailingRunner(Runner):
    """The real chat runner, whose next step after `arm()` runs and then raises. Everything else is the real runner's."""

    family = "chat"

    def __init__(self, inner: CausalLMRunner) -> None:
        self.inner = inner
        self.name = inner.name
        self.armed = False
        self.failed_steps = 0

    def arm(self) -> None:
        self.armed = True

    def load(self) -> None:
        self.inner.load()

    def execute(self, plan: StepPlan) -> list[Output]:
        outputs = self.inner.execute(plan)
        if self.armed:
            self.armed = False
            self.failed_steps += 1
            raise StepFailure("injected failure after the model ran")
        return outputs

    def reset(self) -> None:
        self.inner.reset()

    def kv_token_bytes(self) -> int:
        return self.inner.kv_token_bytes()

    def kv_cost(self, reserves: Sequence[int]) -> int:
        return self.inner.kv_cost(reserves)

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()

    def __getattr__(self, name: str) -> Any:
        # tokenizer, encode_chat, context_length, model_name: what the chat channel reads from its runner
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def failing() -> FailingRunner:
    return FailingRunner(bundled_runner())


async def started(runner: FailingRunner, max_batch: int) -> Engine:
    engine = Engine([RunnerSpec("chat", runner.inner.model_name, lambda: runner)], Limits(max_batch=max_batch, step_tokens=max_batch + 256, prefill_chunk=256))
    await engine.start()
    async with asyncio.timeout(60):
        while not engine.ready("chat"):
            await asyncio.sleep(0.01)
    return engine


def submit(engine: Engine, runner: FailingRunner, text: str, max_new: int) -> Stream:
    ids = runner.inner.encode_chat([{"role": "user", "content": text}])
    return engine.submit(runner.name, len(ids), max_new, GenerationRequest(ids, max_new, SamplingParams()))


async def collect(stream: Stream, out: list[int]) -> str | None:
    async with stream:
        while (update := await stream.next()) is not None:
            out += update.tokens
    return stream.finish_reason


async def until(condition: Callable[[], bool], timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def test_failed_step_ends_only_its_sequences_and_the_loop_goes_on(failing: FailingRunner) -> None:
    engine = await started(failing, max_batch=2)
    try:
        alone: list[int] = []
        assert await collect(submit(engine, failing, "Name three rivers.", 5), alone) == "length"
        tokens: dict[str, list[int]] = {k: [] for k in "abcd"}
        prompts = {"a": "Write a long story about a dragon.", "b": "Explain how a bicycle works.", "c": "Name three rivers.", "d": "Name three rivers."}
        tasks = {k: asyncio.create_task(collect(submit(engine, failing, prompts[k], 48 if k in "ab" else 5), tokens[k])) for k in "abcd"}
        await until(lambda: len(tokens["a"]) >= 2 and len(tokens["b"]) >= 2)
        assert not tokens["c"] and not tokens["d"], "c and d wait for a batch slot"
        failing.arm()
        assert await tasks["a"] == "error" and await tasks["b"] == "error"
        assert len(tokens["a"]) < 48 and len(tokens["b"]) < 48
        assert await tasks["c"] == "length" and await tasks["d"] == "length"
        assert tokens["c"] == alone and tokens["d"] == alone, "the sequences after the failure run exactly as alone"
        after: list[int] = []
        assert await collect(submit(engine, failing, "Name three rivers.", 5), after) == "length" and after == alone
        assert failing.failed_steps == 1 and engine.metrics()["streams"] == 0
        await until(lambda: failing.stats()["rows"] == 0)
    finally:
        await engine.stop()


async def test_failed_step_ends_its_chat_streams_with_internal_and_others_complete(failing: FailingRunner) -> None:
    engine = await started(failing, max_batch=1)
    settings = Settings(api_keys="k", chat_model="")
    services = Services(settings=settings, feeds=Hub(MemoryBroker()), logs=RingLogHandler(10, "n"), stats=dict, engine=engine)
    session = Session(settings, {"chat": ChatChannel(services)}, Principal("test", None), Stats())
    try:
        session.subscribe(Subscribe(op="subscribe", id="first", channel="chat", params={"message": "Write a long story about a dragon.", "max_tokens": 64}))
        session.subscribe(Subscribe(op="subscribe", id="second", channel="chat", params={"message": "Name a colour.", "max_tokens": 6}))
        ends: dict[str, dict[str, Any]] = {}
        deltas: dict[str, int] = {"first": 0, "second": 0}
        async with asyncio.timeout(120):
            while len(ends) < 2:
                frame = orjson.loads(await session.outbox.get())
                if frame["op"] == "chunk" and "delta" in frame["data"]:
                    deltas[frame["id"]] += 1
                    if frame["id"] == "first" and deltas["first"] == 2:
                        failing.arm()
                elif frame["op"] == "end":
                    ends[frame["id"]] = frame
        assert ends["first"] == {
            "op": "end",
            "id": "first",
            "reason": "error",
            "error": {"code": "internal", "message": "generation failed; see the server log"},
        }
        assert ends["second"]["reason"] == "complete" and deltas["second"] >= 1
        assert not session.streams and engine.metrics()["streams"] == 0
    finally:
        await session.end_all(EndReason.UNSUBSCRIBED, notify=False)
        await engine.stop()
