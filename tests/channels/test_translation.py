"""The translation channel: Apertium (real Debian pairs, one persistent pipeline per pair), the neural backend on
a tiny randomly initialised Marian model (tests/tinymarian.py; its output is meaningless, the test checks the
streaming and batching), bad input, and one end-to-end run over the real server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
import torch

from streamplex.channels.apertium import escape, unescape
from streamplex.channels.translation import TranslationChannel, TranslationParams, sentences
from streamplex.server.broker import MemoryBroker
from streamplex.server.channel import ChannelError, Services, StreamContext
from streamplex.server.config import Settings
from streamplex.server.engine import Engine, Limits
from streamplex.server.engine.runner import RunnerSpec
from streamplex.server.engine.seq2seq import Seq2SeqRunner
from streamplex.server.hub import Hub
from streamplex.server.logbuffer import RingLogHandler
from tests.channels.helpers import assert_goes_on_from_every_chunk, make, run
from tests.serverproc import ServerProc, collect, connect, send, start_server
from tests.tinymarian import tiny_marian

KNOWN = {
    "The cat is black.": ["gato", "negro"],
    "I like apples.": ["manzanas"],
    "My name is John and I live in London.": ["nombre", "Londres"],
    "The weather is nice today.": ["hoy"],
}


@pytest.fixture(scope="module")
async def channel() -> TranslationChannel:
    ch = make(TranslationChannel)
    await ch.start()
    yield ch
    await ch.stop()


def test_sentence_split_keeps_the_whitespace() -> None:
    text = 'Hello world. How are you?  Fine!\n\nA line\nand "quoted." End'
    pieces = sentences(text)
    assert [s for s, _ in pieces] == ["Hello world.", "How are you?", "Fine!", "A line", 'and "quoted."', "End"]
    assert "".join(s + sep for s, sep in pieces) == text


def test_stream_format_round_trip() -> None:
    text = "a [b] {c} ^d$ e/f \\g @h <i> ~j"
    assert unescape(escape(text)) == text


async def test_known_sentences_en_es(channel: TranslationChannel) -> None:
    chunks = await run(channel, {"text": " ".join(KNOWN), "source_lang": "en", "target_lang": "es"})
    *deltas, final = chunks
    assert [c["sentence"] for c in deltas] == list(range(len(KNOWN)))
    assert "".join(c["delta"] for c in deltas) == final["text"]
    assert final["backend"] == "apertium" and final["pair"] == "eng-spa" and final["finish_reason"] == "complete"
    for chunk, words in zip(deltas, KNOWN.values(), strict=True):
        assert all(w in chunk["delta"] for w in words), chunk
    assert final["text"].endswith("hoy.")


async def test_en_ca_and_one_process_per_pair(channel: TranslationChannel) -> None:
    chunks = await run(channel, {"text": "The cat is black.", "source_lang": "eng", "target_lang": "cat"})
    assert "gat" in chunks[-1]["text"] and "negre" in chunks[-1]["text"]
    pipeline = channel.apertium.pipelines["eng-spa"]
    assert pipeline.proc is not None
    pid = pipeline.proc.pid
    await run(channel, {"text": "Hello world.", "source_lang": "en", "target_lang": "es"})
    assert pipeline.proc.pid == pid and pipeline.blocks >= 5


async def test_cancelled_stream_leaves_the_pipeline_in_step(channel: TranslationChannel) -> None:
    params = channel.parse({"text": "The cat is black. I like apples. The weather is nice today.", "target_lang": "es"})
    agen = channel.stream(params, StreamContext("s", asyncio.Queue()))
    first = await anext(agen)
    await agen.aclose()
    assert "gato" in first["delta"]
    chunks = await run(channel, {"text": "I like apples.", "target_lang": "es"})
    assert "manzanas" in chunks[-1]["text"]


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"text": ""}, "text"),
        ({"text": "x" * 101}, "limit is 100"),
        ({"text": "Hello.", "target_lang": "de"}, "supported pairs: cat-eng"),
        ({"text": "Hello.", "backend": "neural"}, "STREAMPLEX_TRANSLATION_MODEL"),
        ({"text": "Hello.", "backend": "llm"}, "backend"),
    ],
)
def test_bad_input(params: dict, needle: str) -> None:
    ch = make(TranslationChannel, translation_max_chars=100)
    with pytest.raises(ChannelError) as err:
        ch.parse(params)
    assert err.value.code == "invalid_params"
    assert needle in err.value.message + orjson.dumps(err.value.details).decode()


async def test_neural_backend_streams_tokens(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tiny_marian(tmp_path_factory.mktemp("marian") / "opus-mt-tiny")
    runner = Seq2SeqRunner(str(folder), torch.device("cpu"), torch.float32, 2)
    engine = Engine([RunnerSpec("translation", runner.model_name, lambda: runner)], Limits())
    await engine.start()
    try:
        while not engine.ready("translation"):
            await asyncio.sleep(0.01)
        settings = Settings(api_keys="k", chat_model="", embedding_model="", translation_model=str(folder))
        ch = TranslationChannel(Services(settings=settings, feeds=Hub(MemoryBroker()), logs=RingLogHandler(10, "n"), stats=dict, engine=engine))
        await ch.start()
        text = "The cat is black. Where is the train station? I like apples."
        chunks = await run(ch, {"text": text, "backend": "neural"})
        with pytest.raises(ChannelError, match="translates en -> es only"):
            ch.parse({"text": "Hi", "backend": "neural", "source_lang": "es", "target_lang": "en"})
    finally:
        await engine.stop()
    *deltas, final = chunks
    assert final["backend"] == "neural" and final["sentences"] == 3
    assert "".join(c["delta"] for c in deltas) == final["text"]
    assert [c["sentence"] for c in deltas] == sorted(c["sentence"] for c in deltas)
    assert len(deltas) > 3  # token by token, not one chunk per sentence
    for i, sentence in enumerate(sentences(text)):
        request = runner.request(sentence[0], "en", "es")
        expected = runner.model.generate(
            torch.tensor([request.source]),
            do_sample=False,
            num_beams=1,
            max_new_tokens=runner.max_target - 1,
            bad_words_ids=[[runner.model.config.pad_token_id]],
            forced_eos_token_id=None,
        )
        got = "".join(c["delta"] for c in deltas if c["sentence"] == i)
        assert got.strip() == runner.tokenizer.decode(expected[0], skip_special_tokens=True).strip()


async def test_over_the_server(server: ServerProc) -> None:
    ws = await connect(server)
    await send(ws, op="subscribe", id="t", channel="translation", params={"text": "The cat is black. I like apples.", "source_lang": "en", "target_lang": "es"})
    await send(ws, op="subscribe", id="bad", channel="translation", params={"text": "Hello.", "source_lang": "en", "target_lang": "xx"})
    error = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
    while error["op"] != "error":
        error = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
    assert error["id"] == "bad" and error["code"] == "invalid_params" and "eng-spa" in error["message"]
    chunks, end = await collect(ws, "t", timeout=60)
    assert end["reason"] == "complete"
    final = chunks[-1]["data"]
    assert "gato" in final["text"] and "manzanas" in final["text"]
    await ws.close()
    schema = {c["name"]: c for c in orjson.loads(server.get("/channels")[1])["channels"]}["translation"]["params"]
    assert "eng-spa" in schema["x-apertium-pairs"]


async def test_neural_over_the_server(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tiny_marian(tmp_path_factory.mktemp("marian") / "opus-mt-tiny")
    srv = start_server(tmp_path_factory.mktemp("neural"), translation_model=folder)
    try:
        schema = {c["name"]: c for c in orjson.loads(srv.get("/channels")[1])["channels"]}["translation"]["params"]
        assert schema["x-neural-model"] == "opus-mt-tiny"
        ws = await connect(srv)
        for _ in range(600):  # the model loads in the background after start
            await send(ws, op="subscribe", id="n", channel="translation", params={"text": "The cat is black. Hi", "backend": "neural"})
            first = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
            if first["op"] == "subscribed":
                break
            assert first["code"] == "unavailable", first
            await asyncio.sleep(0.2)
        chunks, end = await collect(ws, "n", timeout=60)
        await ws.close()
    finally:
        srv.stop()
    assert end["reason"] == "complete"
    final = chunks[-1]["data"]
    assert final["backend"] == "neural" and final["sentences"] == 2
    assert "".join(c["data"]["delta"] for c in chunks[:-1]) == final["text"]


def test_missing_apertium_makes_the_channel_unavailable(tmp_path: Path) -> None:
    ch = make(TranslationChannel, apertium_dir=tmp_path)
    assert ch.status().state == "unavailable"


async def test_a_stream_going_on_at_chunk_n_sends_the_uninterrupted_runs_chunks_from_n(channel: TranslationChannel) -> None:
    params = {"text": " ".join(KNOWN), "source_lang": "en", "target_lang": "es"}
    whole = await run(channel, params)
    assert channel.restarts(channel.parse(params)) and len(whole) == len(KNOWN) + 1
    await assert_goes_on_from_every_chunk(channel, params, whole)


def test_the_neural_backend_does_not_restart(channel: TranslationChannel) -> None:
    assert not channel.restarts(TranslationParams(text="Hello.", backend="neural"))
