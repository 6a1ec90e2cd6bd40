"""Per-runner step figures: the last step, running totals, and tokens per second over a sliding window."""

from __future__ import annotations

from collections import deque
from typing import Any


class StepStats:
    """Fed once per step by the engine loop; `snapshot` is a plain dict for /metrics and the metrics channel."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self.steps = 0
        self.batch_size = 0
        self.step_seconds = 0.0
        self.step_seconds_total = 0.0
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self._first: float | None = None
        self._recent: deque[tuple[float, int]] = deque()

    def record(self, now: float, seconds: float, batch_size: int, prompt_tokens: int, generated: int) -> None:
        if self._first is None:
            self._first = now - seconds
        self.steps += 1
        self.batch_size = batch_size
        self.step_seconds = seconds
        self.step_seconds_total += seconds
        self.prompt_tokens_total += prompt_tokens
        self.generated_tokens_total += generated
        self._recent.append((now, generated))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window:
            self._recent.popleft()

    def tokens_per_second(self, now: float) -> float:
        """Generated tokens per second over the last `window` seconds (or since the first step, if sooner)."""
        self._trim(now)
        span = min(self.window, now - self._first) if self._first is not None else 0.0
        return sum(n for _, n in self._recent) / span if span > 0 else 0.0

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "steps_total": self.steps,
            "batch_size": self.batch_size,
            "step_ms": round(self.step_seconds * 1000, 3),
            "step_seconds_total": round(self.step_seconds_total, 6),
            "prompt_tokens_total": self.prompt_tokens_total,
            "generated_tokens_total": self.generated_tokens_total,
            "tokens_per_s": round(self.tokens_per_second(now), 3),
        }
