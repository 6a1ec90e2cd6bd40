"""Per-runner figures: step totals and tokens per second (plain numbers, read at scrape time) and the engine's latency
histograms (time to first token, inter-token latency, queue wait, step time), labelled by runner family and model."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

LABELS = ("runner", "model")
STATES = ("loading", "ready", "failed")
# Token latencies of a CPU or GPU decoder (ms to seconds); queue waits and steps reach further.
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histograms:
    """One engine's histograms, outside any registry (several engines may live in one process); `collect` yields them."""

    def __init__(self) -> None:
        self.first_token = Histogram(
            "streamplex_engine_time_to_first_token_seconds", "From a request's submission to its first token.", LABELS, registry=None, buckets=WAIT_BUCKETS
        )
        self.inter_token = Histogram(
            "streamplex_engine_inter_token_latency_seconds", "Between consecutive tokens of one request.", LABELS, registry=None, buckets=TOKEN_BUCKETS
        )
        self.queue_wait = Histogram(
            "streamplex_engine_queue_wait_seconds",
            "From a request's submission to its admission into a step (sequences) or its first item's step (item jobs).",
            LABELS,
            registry=None,
            buckets=WAIT_BUCKETS,
        )
        self.step = Histogram(
            "streamplex_engine_step_seconds", "Duration of one engine step (one batch on the model).", LABELS, registry=None, buckets=WAIT_BUCKETS
        )

    def collect(self) -> Iterator[Metric]:
        for histogram in (self.first_token, self.inter_token, self.queue_wait, self.step):
            yield from histogram.collect()


class StepStats:
    """One runner's figures, fed once per step by the engine loop; `snapshot` is a plain dict for the metrics channel."""

    def __init__(self, family: str, model: str, histograms: Histograms, window: float = 10.0) -> None:
        self.window = window
        self.steps = 0
        self.batch_size = 0
        self.step_seconds = 0.0
        self.step_seconds_total = 0.0
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self._first: float | None = None
        self._recent: deque[tuple[float, int]] = deque()
        self.first_token = histograms.first_token.labels(family, model)
        self.inter_token = histograms.inter_token.labels(family, model)
        self.queue_wait = histograms.queue_wait.labels(family, model)
        self._step = histograms.step.labels(family, model)

    def record(self, now: float, seconds: float, batch_size: int, prompt_tokens: int, generated: int) -> None:
        if self._first is None:
            self._first = now - seconds
        self.steps += 1
        self.batch_size = batch_size
        self.step_seconds = seconds
        self.step_seconds_total += seconds
        self.prompt_tokens_total += prompt_tokens
        self.generated_tokens_total += generated
        self._step.observe(seconds)
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


# The engine snapshot's numeric figures as Prometheus families: key -> (name, type, help). Keys not listed
# (step_ms, step_seconds_total: the step histogram has them) are not exported.
FAMILIES: dict[str, tuple[str, str, str]] = {
    "steps_total": ("streamplex_engine_steps", "counter", "Engine steps run."),
    "prompt_tokens_total": ("streamplex_engine_prompt_tokens", "counter", "Prompt tokens prefilled."),
    "generated_tokens_total": ("streamplex_engine_generated_tokens", "counter", "Tokens generated."),
    "items_total": ("streamplex_engine_items", "counter", "Items (e.g. sentences to embed) taken into steps."),
    "jobs_total": ("streamplex_engine_jobs", "counter", "Item jobs queued."),
    "texts_total": ("streamplex_engine_texts", "counter", "Texts embedded."),
    "prefix_cache_hits": ("streamplex_engine_prefix_cache_hits", "counter", "Prompts that reused a cached prefix."),
    "prefix_tokens_saved": ("streamplex_engine_prefix_tokens_saved", "counter", "Prompt tokens not prefilled thanks to the prefix cache."),
    "batch_size": ("streamplex_engine_batch_size", "gauge", "Sequences or items in the last step."),
    "tokens_per_s": ("streamplex_engine_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s."),
    "running": ("streamplex_engine_running_sequences", "gauge", "Sequences in the batch."),
    "waiting": ("streamplex_engine_waiting_sequences", "gauge", "Sequences queued for admission."),
    "waiting_items": ("streamplex_engine_waiting_items", "gauge", "Items queued for a step."),
    "kv_reserved_tokens": ("streamplex_engine_kv_reserved_tokens", "gauge", "KV cache tokens reserved by admitted sequences."),
    "kv_budget_tokens": ("streamplex_engine_kv_budget_tokens", "gauge", "KV cache tokens the scheduler may reserve."),
    "rows": ("streamplex_engine_rows", "gauge", "Rows held in the runner's batch tensors."),
    "kv_bytes": ("streamplex_engine_kv_bytes", "gauge", "Bytes of KV cache allocated."),
    "prefix_cache_tokens": ("streamplex_engine_prefix_cache_tokens", "gauge", "Tokens held by the prefix cache."),
}


def families(snapshot: dict[str, Any]) -> Iterator[Metric]:
    """An `Engine.metrics()` snapshot as labelled families: one name per quantity, `runner` (family) and `model` labels."""
    state = GaugeMetricFamily(
        "streamplex_engine_state", "1 for each runner's current state (loading, ready or failed), 0 for the others.", labels=[*LABELS, "state"]
    )
    built = {
        key: (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(metric, doc, labels=list(LABELS))
        for key, (metric, kind, doc) in FAMILIES.items()
    }
    for name, figures in snapshot["runners"].items():
        family, model = name.split("/", 1)
        for each in STATES:
            state.add_metric([family, model, each], float(figures["state"] == each))
        for key, value in figures.items():
            if key in built and isinstance(value, int | float):
                built[key].add_metric([family, model], float(value))
    yield state
    yield GaugeMetricFamily("streamplex_engine_streams", "Engine requests in flight (queued or generating).", value=snapshot["streams"])
    yield from built.values()
