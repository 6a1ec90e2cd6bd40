"""The real bundled MiniLM embedding runner (float32 on CPU) for model tests: loaded once per test session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cache

import torch

from streamplex.server.engine import BatchRunner, Engine, Limits
from streamplex.server.engine.device import cpu_threads
from streamplex.server.engine.embedding import BUNDLED, EmbeddingRunner
from streamplex.server.engine.runner import RunnerSpec


@cache
def embedding_runner() -> EmbeddingRunner:
    """The loaded runner, shared by every test module."""
    runner = EmbeddingRunner(BUNDLED, torch.device("cpu"), torch.float32, cpu_threads(0))
    runner.load()
    return runner


@asynccontextmanager
async def engine_with(runner: BatchRunner, **limits: int) -> AsyncIterator[Engine]:
    """An engine around one batch runner, started and ready, stopped afterwards."""
    engine = Engine([RunnerSpec(runner.family, runner.name.split("/", 1)[1], lambda: runner)], Limits(**limits))
    await engine.start()
    try:
        while not engine.ready(runner.family):
            await asyncio.sleep(0.01)
        yield engine
    finally:
        await engine.stop()
