"""The one-shot batch runner kind, with the real MiniLM embedding model: jobs of many streams share steps,
results match each job run alone, cancelled items are skipped, and a failing step fails only its jobs."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from streamplex.server.engine import BatchRunner, EngineError, StepFailed
from streamplex.server.engine.embedding import EmbeddingRunner
from tests.embedmodel import embedding_runner, engine_with

DOCS = [
    ["The stock market fell sharply today.", "Investors sold shares of banks."],
    ["The team won the football match.", "Fans celebrated in the stadium all night.", "The coach praised the players."],
    ["It rained all week in the mountains."],
    ["A new vaccine was approved by regulators.", "Doctors expect fewer hospital visits."],
]


async def test_jobs_share_steps_and_match_alone() -> None:
    runner = embedding_runner()
    async with engine_with(runner) as engine:
        alone = [await engine.submit_items(runner.name, doc).wait() for doc in DOCS]
        steps_before = engine.metrics()["runners"][runner.name]["steps_total"]
        jobs = [engine.submit_items(runner.name, doc) for doc in DOCS]
        together = await asyncio.gather(*(job.wait() for job in jobs))
        figures = engine.metrics()["runners"][runner.name]
    assert figures["steps_total"] - steps_before == 1  # all four streams' sentences in one forward pass
    assert figures["batch_size"] == sum(map(len, DOCS)) and figures["dimensions"] == 384
    for one, many in zip(alone, together, strict=True):
        assert np.allclose(np.stack(one), np.stack(many), atol=1e-5)
    vectors = together[1]
    assert all(abs(float(np.linalg.norm(v)) - 1) < 1e-4 for v in vectors)
    sport, finance = vectors[0], together[0][0]
    assert float(sport @ vectors[1]) > float(sport @ finance)


async def test_step_limit_splits_a_large_job() -> None:
    runner = embedding_runner()
    sentences = [f"Sentence number {i} is about nothing in particular." for i in range(10)]
    async with engine_with(runner, batch_items=4) as engine:
        result = await engine.submit_items(runner.name, sentences).wait()
        assert engine.metrics()["runners"][runner.name]["steps_total"] == 3
    assert len(result) == 10


async def test_cancelled_job_is_skipped_and_others_finish() -> None:
    runner = embedding_runner()
    async with engine_with(runner, batch_items=2) as engine:
        first = engine.submit_items(runner.name, ["one", "two", "three", "four", "five", "six"])
        second = engine.submit_items(runner.name, ["seven"])
        first.cancel()
        assert len(await second.wait()) == 1
        with pytest.raises(asyncio.CancelledError):
            await first.wait()
        assert engine.metrics()["runners"][runner.name]["items_total"] <= 3


async def test_queue_limits_are_engine_errors() -> None:
    runner = embedding_runner()
    async with engine_with(runner, max_waiting_items=3) as engine:
        with pytest.raises(EngineError) as too_big:
            engine.submit_items(runner.name, ["a", "b", "c", "d"])
        assert too_big.value.code == "invalid"
        with pytest.raises(EngineError) as not_ready:
            engine.submit_items("embedding/other", ["a"])
        assert not_ready.value.code == "unavailable"


class FailOnce(BatchRunner):
    """The real embedding runner, whose next step after `arm()` raises after running."""

    family = "embedding"

    def __init__(self, inner: EmbeddingRunner) -> None:
        self.inner = inner
        self.name = inner.name
        self.armed = False

    def load(self) -> None:
        self.inner.load()

    def run(self, items: Sequence[Any]) -> list[Any]:
        out = self.inner.run(items)
        if self.armed:
            self.armed = False
            raise RuntimeError("injected failure")
        return out


async def test_failed_step_fails_its_jobs_only() -> None:
    runner = FailOnce(embedding_runner())
    async with engine_with(runner) as engine:
        runner.armed = True
        with pytest.raises(StepFailed, match="injected failure"):
            await engine.submit_items(runner.name, ["doomed"]).wait()
        assert len(await engine.submit_items(runner.name, ["fine", "also fine"]).wait()) == 2


async def test_engine_stop_fails_waiting_jobs() -> None:
    runner = embedding_runner()
    async with engine_with(runner, batch_items=1) as engine:
        in_step = engine.submit_items(runner.name, ["a sentence being embedded when the engine stops " * 20])
        while engine.queues[runner.name].pending:  # wait until the loop has taken it into a step
            await asyncio.sleep(0)
        queued = engine.submit_items(runner.name, [f"sentence {i}" for i in range(50)])
        assert not in_step.done
    for job in (in_step, queued):
        with pytest.raises(StepFailed, match="stopped"):
            await job.wait()
