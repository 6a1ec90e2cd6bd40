"""The interface between the engine loop and a model family (chat LM now; Whisper, MiniLM, seq2seq later).

A runner owns a model and the per-sequence state (KV caches, samplers) and is the only code that touches
tensors. The engine calls `load` once and `execute` for every step, always from one worker thread at a
time, so a runner needs no locks. Everything else (queueing, admission, fairness) is the scheduler's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from streamplex.server.engine.batch import BatchRunner
from streamplex.server.engine.scheduler import Output, StepPlan, summed


class Runner(ABC):
    """One model in the engine. `name` is unique across the engine, e.g. `chat/smollm2-135m-instruct`."""

    name: str
    family: str

    @abstractmethod
    def load(self) -> None:
        """Load the model (blocking; called once, off the event loop). Calling it again is a no-op."""

    @abstractmethod
    def execute(self, plan: StepPlan) -> list[Output]:
        """Run one step: free `plan.release`, set up `plan.admit`, decode, then prefill; return the outputs."""

    @abstractmethod
    def reset(self) -> None:
        """Drop every sequence's state (after a failed step)."""

    def kv_token_bytes(self) -> int:
        """Bytes one cached token takes (after `load`); 0 for a runner that keeps no per-token cache."""
        return 0

    def kv_cost(self, reserves: Sequence[int]) -> int:
        """KV tokens a set of sequences occupies at most in this runner's layout (default: their sum)."""
        return summed(reserves)

    def describe(self) -> dict[str, Any]:
        """Static facts for metrics and logs (device, dtype, model)."""
        return {}

    def stats(self) -> dict[str, Any]:
        """Live figures for metrics (rows held, KV bytes allocated); read from the event loop thread."""
        return {}


@dataclass(frozen=True)
class RunnerSpec:
    """A runner known by name before it exists: `create` builds it in the loader thread (importing torch there)."""

    family: str
    model: str
    create: Callable[[], Runner | BatchRunner]

    @property
    def name(self) -> str:
        return f"{self.family}/{self.model}"
