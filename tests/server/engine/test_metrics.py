"""The engine's Prometheus families on the real bundled chat and embedding models: one name per quantity, labelled by
runner family and model; histograms of time to first token, inter-token latency, queue wait and step time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamplex.server.engine import Engine, GenerationRequest, SamplingParams
from streamplex.server.engine.metrics import families
from tests.chatmodel import bundled_runner, engine_with
from tests.embedmodel import embedding_runner
from tests.embedmodel import engine_with as embedding_engine_with


def scrape(engine: Engine) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of the engine's families, by sample name then sorted labels."""
    registry = CollectorRegistry()

    class Engine:
        def collect(self):
            yield from families(engine.metrics())
            yield from engine.histograms.collect()

    registry.register(Engine())
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def test_chat_request_feeds_the_histograms() -> None:
    runner = bundled_runner()
    async with engine_with(runner) as engine:
        ids = runner.encode_chat([{"role": "user", "content": "Count to ten."}])
        stream = engine.submit(runner.name, len(ids), 8, GenerationRequest(ids, 8, SamplingParams()))
        async with stream:
            while await stream.next() is not None:
                pass
        tokens = stream.completion_tokens
        samples = scrape(engine)
    chat = (("model", runner.model_name), ("runner", "chat"))
    assert tokens == 8
    assert samples["streamplex_engine_time_to_first_token_seconds_count"][chat] == 1
    assert samples["streamplex_engine_inter_token_latency_seconds_count"][chat] == tokens - 1
    assert samples["streamplex_engine_queue_wait_seconds_count"][chat] == 1
    steps = samples["streamplex_engine_steps_total"][chat]
    assert steps >= tokens and samples["streamplex_engine_step_seconds_count"][chat] == steps
    assert samples["streamplex_engine_generated_tokens_total"][chat] == tokens
    assert samples["streamplex_engine_prompt_tokens_total"][chat] == len(ids)
    assert samples["streamplex_engine_state"][(*chat, ("state", "ready"))] == 1
    assert samples["streamplex_engine_state"][(*chat, ("state", "loading"))] == 0
    ttft = samples["streamplex_engine_time_to_first_token_seconds_sum"][chat]
    assert 0 < ttft < samples["streamplex_engine_step_seconds_sum"][chat] + 1  # the first token waits for one step (prefill), not longer


async def test_embedding_jobs_feed_queue_wait_and_item_counters() -> None:
    runner = embedding_runner()
    async with embedding_engine_with(runner, batch_items=2) as engine:
        jobs = [engine.submit_items(runner.name, ["one sentence", "two sentences", "three"]) for _ in range(2)]
        for job in jobs:
            await job.wait()
        samples = scrape(engine)
    labels = (("model", runner.name.split("/", 1)[1]), ("runner", "embedding"))
    assert samples["streamplex_engine_items_total"][labels] == 6 and samples["streamplex_engine_jobs_total"][labels] == 2
    assert samples["streamplex_engine_queue_wait_seconds_count"][labels] == 2  # once per job, at its first step
    assert samples["streamplex_engine_steps_total"][labels] == samples["streamplex_engine_step_seconds_count"][labels] == 3
    assert samples["streamplex_engine_time_to_first_token_seconds_count"][labels] == 0  # no token streams on an embedding runner
