"""The neural translation runner on a tiny, randomly initialised Marian model that tests/tinymarian.py builds
(no real translation weights are available here): greedy outputs are the same whether sentences decode
together in one batch, join a running batch, or run one at a time, and equal to Hugging Face `generate`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from streamplex.server.engine import Engine, Limits
from streamplex.server.engine.runner import RunnerSpec
from streamplex.server.engine.seq2seq import Seq2SeqRunner
from tests.device import TEST_DEVICE
from tests.tinymarian import tiny_marian

SENTENCES = ["The cat is black.", "Where is the train station?", "I like apples and oranges, and the weather is nice today.", "Hi", "My name is John."]
MAX_NEW = 24


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Seq2SeqRunner:
    runner = Seq2SeqRunner(str(tiny_marian(tmp_path_factory.mktemp("marian") / "opus-mt-tiny")), TEST_DEVICE, torch.float32, 2)
    runner.load()
    return runner


async def translate(engine: Engine, runner: Seq2SeqRunner, text: str) -> list[int]:
    request = runner.request(text, "en", "es")
    tokens: list[int] = []
    async with engine.submit(runner.name, len(request.source), MAX_NEW, request) as stream:
        while (update := await stream.next()) is not None:
            tokens += update.tokens
    return tokens


async def started(runner: Seq2SeqRunner, **limits: int) -> Engine:
    engine = Engine([RunnerSpec("translation", runner.model_name, lambda: runner)], Limits(**limits))
    await engine.start()
    while not engine.ready("translation"):
        await asyncio.sleep(0.01)
    return engine


async def test_batched_equals_one_at_a_time_and_generate(runner: Seq2SeqRunner) -> None:
    engine = await started(runner)
    try:
        alone = [await translate(engine, runner, s) for s in SENTENCES]
        together = await asyncio.gather(*(translate(engine, runner, s) for s in SENTENCES))
        early = [asyncio.create_task(translate(engine, runner, s)) for s in SENTENCES[:2]]
        await asyncio.sleep(0.05)
        late = await asyncio.gather(*(translate(engine, runner, s) for s in SENTENCES[2:]))
        joined = [*(await asyncio.gather(*early)), *late]
        batches = engine.metrics()["runners"][runner.name]
    finally:
        await engine.stop()
    assert together == alone and joined == alone
    assert batches["steps_total"] > 0 and any(len(t) > 3 for t in alone)
    for text, tokens in zip(SENTENCES, alone, strict=True):
        inputs = runner.tokenizer(text, return_tensors="pt").to(runner.device)
        reference = runner.model.generate(
            **inputs, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW, bad_words_ids=[[runner.model.config.pad_token_id]], forced_eos_token_id=None
        )
        expected = reference[0, 1:].tolist()
        assert tokens == expected[: len(tokens)] and (len(tokens) == len(expected) or expected[len(tokens)] == runner.model.config.pad_token_id)


async def test_source_longer_than_a_prefill_chunk(runner: Seq2SeqRunner) -> None:
    text = "The cat is black and the weather is nice today."
    engine = await started(runner, max_batch=4, step_tokens=12, prefill_chunk=8)
    try:
        chunked = await translate(engine, runner, text)
    finally:
        await engine.stop()
    engine = await started(runner)
    try:
        whole = await translate(engine, runner, text)
    finally:
        await engine.stop()
    assert len(runner.request(text, "en", "es").source) > 8 and chunked == whole


def test_too_long_sentence_is_refused(runner: Seq2SeqRunner, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="longer than the model"):
        runner.request("apples " * 200, "en", "es")
