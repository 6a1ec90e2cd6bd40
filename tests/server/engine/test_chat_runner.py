"""The chat runner on the real bundled model (SmolLM2-135M-Instruct, float32 on CPU), loaded once per session."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import pytest
import torch

from streamplex.server.engine import Engine, GenerationRequest, SamplingParams, Stream
from streamplex.server.engine.causal_lm import CausalLMRunner
from streamplex.server.engine.detok import IncrementalDetokenizer
from tests.chatmodel import bundled_runner, engine_with
from tests.device import TEST_DEVICE


@pytest.fixture(scope="session")
def runner() -> CausalLMRunner:
    return bundled_runner()


def prompt(runner: CausalLMRunner, text: str) -> list[int]:
    return runner.encode_chat([{"role": "user", "content": text}])


GREEDY = SamplingParams()
# float32 (the reference) and each CPU weight format the chat runner offers (server/engine/cpu_weights.py).
WEIGHTS = ["float32", "float16"]


def submit(engine: Engine, runner: CausalLMRunner, ids: list[int], max_new: int, sampling: SamplingParams = GREEDY) -> Stream:
    return engine.submit(runner.name, len(ids), max_new, GenerationRequest(ids, max_new, sampling))


async def collect(stream: Stream, out: list[int]) -> str | None:
    async with stream:
        while (update := await stream.next()) is not None:
            out += update.tokens
    return stream.finish_reason


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.005)


STORY = "Write a short story about a lighthouse keeper."
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1234)


@pytest.mark.parametrize("weights", WEIGHTS)
async def test_batched_tokens_equal_alone_with_joins_and_leaves(weights: str) -> None:
    if weights != "float32" and TEST_DEVICE.type != "cpu":
        pytest.skip("a CPU weight format")
    runner = bundled_runner(weights)
    story, fact, poem, other = (
        prompt(runner, STORY),
        prompt(runner, "Explain what a compiler does."),
        prompt(runner, "Write a poem about autumn leaves."),
        prompt(runner, "List five uses of copper."),
    )
    async with engine_with(runner, max_batch=8, step_tokens=264, prefill_chunk=256) as engine:
        alone: list[int] = []
        assert await collect(submit(engine, runner, story, 24), alone) == "length"
        seeded_alone: list[int] = []
        await collect(submit(engine, runner, poem, 12, SEEDED), seeded_alone)

        tokens: dict[str, list[int]] = {k: [] for k in ("fact", "other", "story", "poem", "dropped")}
        tasks = [asyncio.create_task(collect(submit(engine, runner, fact, 6), tokens["fact"]))]
        tasks.append(asyncio.create_task(collect(submit(engine, runner, other, 40), tokens["other"])))
        await until(lambda: len(tokens["fact"]) >= 3)
        tasks.append(asyncio.create_task(collect(submit(engine, runner, story, 24), tokens["story"])))
        dropped = submit(engine, runner, other, 40)
        tasks.append(asyncio.create_task(collect(dropped, tokens["dropped"])))
        await until(lambda: len(tokens["story"]) >= 5)
        tasks.append(asyncio.create_task(collect(submit(engine, runner, poem, 12, SEEDED), tokens["poem"])))
        await until(lambda: len(tokens["dropped"]) >= 4)
        dropped.cancel()
        await asyncio.gather(*tasks)

    assert tokens["story"] == alone, "greedy tokens must not depend on what else is in the batch"
    assert tokens["poem"] == seeded_alone, "seeded sampling must not depend on the batch either"
    assert tokens["other"][:4] == tokens["dropped"][:4]
    reference = runner.model.generate(torch.tensor([story]), max_new_tokens=24, do_sample=False)[0, len(story) :].tolist()
    assert alone == reference, "the engine's greedy tokens are Hugging Face generate's (the same weights)"


async def test_cancel_frees_the_row_at_the_next_step(runner: CausalLMRunner) -> None:
    async with engine_with(runner, max_batch=4, step_tokens=260, prefill_chunk=256) as engine:
        kept, dropped = [], []
        task = asyncio.create_task(collect(submit(engine, runner, prompt(runner, STORY), 64), kept))
        stream = submit(engine, runner, prompt(runner, "Describe the ocean."), 64)
        drop_task = asyncio.create_task(collect(stream, dropped))
        await until(lambda: len(dropped) >= 3 and len(kept) >= 3)
        runner_metrics = lambda: engine.metrics()["runners"][runner.name]  # noqa: E731
        assert runner.stats()["rows"] == 2
        steps = runner_metrics()["steps_total"]
        stream.cancel()
        assert runner_metrics()["running"] == 1, "the scheduler slot is free at once"
        await until(lambda: runner_metrics()["steps_total"] >= steps + 2)
        assert runner.stats()["rows"] == 1, "the row is gone after the step in flight and the next one"
        assert await drop_task == "cancelled"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await until(lambda: runner.stats()["kv_bytes"] == 0)
        assert engine.metrics()["streams"] == 0


def test_detokenizer_never_splits_a_character(runner: CausalLMRunner) -> None:
    text = "Café ☕ 東京タワー 🙂👍🏽 naïve résumé"
    ids = runner.tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(runner.tokenizer)
    deltas = [detok.push([i]) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert len([d for d in deltas if d]) < len(ids), "multi-token characters come out whole"


async def test_prefix_cache_skips_shared_prompt_tokens_and_changes_no_output(runner: CausalLMRunner) -> None:
    first, second = prompt(runner, "Name three rivers in Europe."), prompt(runner, "Name three mountains in Asia.")
    long_turn = runner.encode_chat(
        [
            {"role": "user", "content": "Name three rivers in Europe."},
            {"role": "assistant", "content": "The Danube, the Rhine and the Seine."},
            {"role": "user", "content": "Which is longest?"},
        ]
    )
    bound = runner.prefixes.max_tokens
    try:
        runner.prefixes.clear()
        runner.prefixes.max_tokens = 0  # off: every prompt is prefilled whole
        async with engine_with(runner, max_batch=8, step_tokens=264, prefill_chunk=256) as engine:
            plain = [[], [], []]
            for ids, out in zip((first, second, long_turn), plain, strict=True):
                await collect(submit(engine, runner, ids, 12), out)
        runner.prefixes.max_tokens = bound
        async with engine_with(runner, max_batch=8, step_tokens=264, prefill_chunk=256) as engine:
            hits, saved = runner.prefixes.hits, runner.prefixes.saved
            cached = [[], [], []]
            await collect(submit(engine, runner, first, 12), cached[0])
            await asyncio.gather(collect(submit(engine, runner, second, 12), cached[1]), collect(submit(engine, runner, long_turn, 12), cached[2]))
            assert runner.prefixes.hits - hits >= 2
            # The second prompt shares the template's system prompt; the follow-up turn, the whole first prompt.
            assert runner.prefixes.saved - saved >= len(first) - 1
        assert cached == plain
    finally:
        runner.prefixes.max_tokens = bound


async def test_the_prefix_cache_is_per_tenant(runner: CausalLMRunner) -> None:
    ids = prompt(runner, "Name three rivers in Europe.")

    def run(tenant: str) -> Stream:
        return engine.submit(runner.name, len(ids), 6, GenerationRequest(ids, 6, GREEDY, tenant=tenant))

    runner.prefixes.clear()
    async with engine_with(runner, max_batch=8, step_tokens=264, prefill_chunk=256) as engine:
        outs: dict[str, list[int]] = {"a": [], "b": [], "a again": [], "b again": []}
        hits = [runner.prefixes.hits]
        for name in outs:
            await collect(run(name.split()[0]), outs[name])
            hits.append(runner.prefixes.hits)
    # a: nothing kept; b: the identical prompt, kept for a only, gets no hit; then each hits its own.
    assert [after - before for before, after in itertools.pairwise(hits)] == [0, 0, 1, 1]
    assert len({tuple(out) for out in outs.values()}) == 1, "cached or not, the same tokens"


def test_prefix_cache_entries_are_matched_within_their_tenant_only() -> None:
    from streamplex.server.engine.causal_lm import PrefixCache

    cache = PrefixCache(8)
    kv = torch.zeros(2, 1, 4, 1)
    cache.add([1, 2, 3, 4], kv, "a")
    assert cache.longest([1, 2, 3, 4, 5], "b") == (0, None) and cache.hits == 0
    length, found = cache.longest([1, 2, 3, 4, 5], "a")
    assert length == 4 and found is not None and cache.hits == 1
    cache.add([1, 2, 3, 4], kv, "b")  # the same tokens for another tenant: a separate entry
    cache.add([9, 9], kv, "c")  # 10 tokens kept > 8: a's (least recently used first) goes
    assert cache.tokens == 6 and cache.longest([1, 2, 3, 4, 5], "a") == (0, None)
