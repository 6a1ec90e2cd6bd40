"""The real bundled chat model (SmolLM2-135M-Instruct, float32 on TEST_DEVICE) for model tests: loaded once per test session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cache

import torch

from streamplex.server.config import Settings
from streamplex.server.engine import Engine, Limits
from streamplex.server.engine.causal_lm import CausalLMRunner
from streamplex.server.engine.device import cpu_threads
from streamplex.server.engine.loading import BUNDLED
from streamplex.server.engine.runner import RunnerSpec
from tests.device import TEST_DEVICE


@cache
def bundled_runner(weights: str = "float32") -> CausalLMRunner:
    """The loaded runner with CPU weights in the format `weights` (on CUDA: float32), shared by every test module."""
    runner = CausalLMRunner(BUNDLED, Settings().cache_dir, TEST_DEVICE, torch.float32, cpu_threads(0), weights=weights)
    runner.load()
    return runner


@asynccontextmanager
async def engine_with(runner: CausalLMRunner, **limits: int) -> AsyncIterator[Engine]:
    """An engine around `runner`, started and ready, stopped afterwards."""
    engine = Engine([RunnerSpec("chat", runner.model_name, lambda: runner)], Limits(**limits))
    await engine.start()
    try:
        while not engine.ready("chat"):
            await asyncio.sleep(0.01)
        yield engine
    finally:
        await engine.stop()
