"""The analysis channel with the real models: VADER, spaCy NER, MiniLM (in the engine) and YAKE; bad input;
and one `all` analysis end to end over the real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest

from streamplex.channels.analysis import DEFAULT_TOPICS, AnalysisChannel, centrality_summary
from streamplex.server.broker import MemoryBroker
from streamplex.server.channel import AVAILABLE, ChannelError, ChannelStatus, Services
from streamplex.server.config import Settings
from streamplex.server.engine import Engine
from streamplex.server.engine.runner import RunnerSpec
from streamplex.server.hub import Hub
from streamplex.server.logbuffer import RingLogHandler
from tests.channels.helpers import assert_goes_on_from_every_chunk, make, run
from tests.embedmodel import embedding_runner, engine_with
from tests.serverproc import ServerProc, collect, connect, send, start_server

NEWS = (
    "Barack Obama visited Paris on Monday. "
    "He met Emmanuel Macron at the Elysee Palace to discuss climate policy. "
    "Apple shares rose 3% in New York after strong iPhone sales."
)


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[Engine]:
    async with engine_with(embedding_runner()) as eng:
        yield eng


@pytest.fixture(scope="module")
async def channel(engine: Engine) -> AsyncIterator[AnalysisChannel]:
    settings = Settings(api_keys="k", chat_model="", analysis_max_chars=2000)
    ch = AnalysisChannel(Services(settings=settings, feeds=Hub(MemoryBroker()), logs=RingLogHandler(10, "n"), stats=dict, engine=engine))
    await ch.start()
    yield ch
    await ch.stop()


def sections(chunks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [c for c in chunks if c["section"] == name]


async def test_sentiment_signs(channel: AnalysisChannel) -> None:
    text = "I love this wonderful phone, it is excellent! The service was terrible and the food was awful. The meeting is at noon."
    chunks = await run(channel, {"content": text, "analysis_type": "sentiment"})
    per = sections(chunks, "sentence")
    assert [c["sentiment"]["label"] for c in per] == ["positive", "negative", "neutral"]
    assert per[0]["sentiment"]["compound"] > 0.5 and per[1]["sentiment"]["compound"] < -0.5
    assert chunks[-1]["section"] == "aggregate" and "topic" not in chunks[-1] and chunks[-1]["sentences"] == 3
    assert [c["section"] for c in chunks] == ["sentence"] * 3 + ["aggregate"]


async def test_entities_labels_and_offsets(channel: AnalysisChannel) -> None:
    chunks = await run(channel, {"content": NEWS, "analysis_type": "entity"})
    found = {(e["text"], e["label"]) for c in sections(chunks, "sentence") for e in c["entities"]}
    assert {("Barack Obama", "PERSON"), ("Paris", "GPE"), ("Monday", "DATE"), ("New York", "GPE")} <= found
    for c in sections(chunks, "sentence"):
        assert NEWS[c["start"] : c["end"]].strip() == c["text"]
        for e in c["entities"]:
            assert NEWS[e["start"] : e["end"]] == e["text"] and c["start"] <= e["start"] < e["end"] <= c["end"]
    assert chunks[-1]["entities"]["GPE"] >= 2


@pytest.mark.parametrize(
    ("text", "topic"),
    [
        ("The striker scored twice and the team won the championship final. Fans cheered in the stadium.", "sports"),
        ("The central bank raised interest rates. Bond yields and the stock market reacted to inflation data.", "finance"),
        ("Simmer the tomatoes with garlic and basil, then stir in the pasta.", "cooking"),
    ],
)
async def test_topic_wins(channel: AnalysisChannel, text: str, topic: str) -> None:
    chunks = await run(channel, {"content": text, "analysis_type": "topic", "topics": ["sports", "finance", "cooking", "politics"]})
    topics = sections(chunks, "topics")[0]
    assert topics["topics"][0]["label"] == topic and chunks[-1]["topic"] == topic
    assert topics["keywords"] and all(k["keyword"].lower() in text.lower() for k in topics["keywords"])


async def test_summary_is_an_ordered_subset(channel: AnalysisChannel) -> None:
    lines = [
        "Solar power capacity grew quickly across Europe last year.",
        "Solar power capacity grew quickly across Europe last year.",
        "Governments subsidised rooftop solar panels and wind farms.",
        "My cat likes to sleep on the sofa.",
        "Energy prices pushed households toward renewable power.",
        "Wind and solar now supply a large share of European electricity.",
    ]
    chunks = await run(channel, {"content": " ".join(lines), "analysis_type": "summary", "max_sentences": 3})
    summary = sections(chunks, "summary")[0]
    indexes = [s["index"] for s in summary["sentences"]]
    assert len(indexes) == 3 and indexes == sorted(indexes)
    assert all(s["text"] == lines[s["index"]] for s in summary["sentences"])
    assert not {0, 1} <= set(indexes)  # the duplicate is redundant
    assert 3 not in indexes  # the off-topic sentence is the least central


async def test_too_many_sentences_end_with_an_error(channel: AnalysisChannel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("streamplex.channels.analysis.MAX_SENTENCES", 3)
    with pytest.raises(ChannelError, match="4 sentences; the limit is 3"):
        await run(channel, {"content": "One. Two. Three. Four.", "analysis_type": "sentiment"})


def test_centrality_summary_order_and_redundancy() -> None:
    v = np.array([[1, 0, 0], [1, 0, 0], [0.6, 0.8, 0], [0, 0, 1]], dtype=np.float32)
    assert [i for i, _ in centrality_summary(v, 2)] == [0, 2]
    assert centrality_summary(v[:1], 3) == [(0, 1.0)]


@pytest.mark.parametrize(
    ("params", "code", "needle"),
    [
        ({"content": ""}, "invalid_params", "content"),
        ({"content": "   "}, "invalid_params", "blank"),
        ({"content": "x" * 2001}, "invalid_params", "limit is 2000"),
        ({"content": "Hello.", "analysis_type": "emotion"}, "invalid_params", "analysis_type"),
        ({"content": "Hello.", "topics": []}, "invalid_params", "topics"),
        ({"content": "Hello.", "max_sentences": 0}, "invalid_params", "max_sentences"),
    ],
)
def test_bad_input(channel: AnalysisChannel, params: dict, code: str, needle: str) -> None:
    with pytest.raises(ChannelError) as err:
        channel.parse(params)
    assert err.value.code == code and needle in err.value.message + orjson.dumps(err.value.details).decode()


def test_status_follows_the_embedding_model() -> None:
    """`loading` while MiniLM loads (topics and summaries wait for it); available without it, saying what is missing if it failed."""
    embedding = Engine([RunnerSpec("embedding", "all-minilm-l6-v2", lambda: None)])  # type: ignore[arg-type,return-value]
    channel = AnalysisChannel(SimpleNamespace(settings=Settings(api_keys="k", chat_model=""), engine=embedding))  # type: ignore[arg-type]
    assert channel.status().state == "loading" and "embedding model is loading" in str(channel.status().reason)
    embedding.errors["embedding/all-minilm-l6-v2"] = "no such file"
    assert channel.status() == ChannelStatus("available", "topics and summaries are unavailable: no such file")
    assert make(AnalysisChannel).status() == AVAILABLE  # no embedding model configured: sentiment and entities only


def test_topics_without_the_embedding_model() -> None:
    ch = make(AnalysisChannel)
    assert ch.parse({"content": "Great!", "analysis_type": "sentiment"})
    with pytest.raises(ChannelError) as err:
        ch.parse({"content": "Great!", "analysis_type": "summary"})
    assert err.value.code == "unavailable" and "STREAMPLEX_EMBEDDING_MODEL" in err.value.message


@pytest.fixture(scope="module")
def analysis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = start_server(tmp_path_factory.mktemp("analysis"), embedding_model="all-minilm-l6-v2")
    try:
        yield srv
    finally:
        srv.stop()


async def test_all_over_the_server(analysis_server: ServerProc) -> None:
    ws = await connect(analysis_server)
    for _ in range(600):  # the embedding model loads in the background after start; `ready` says so until it is in
        if orjson.loads(analysis_server.get("/ready")[1])["channels"]["analysis"] == "available":
            break
        await asyncio.sleep(0.1)
    await send(ws, op="subscribe", id="a", channel="analysis", params={"content": NEWS, "analysis_type": "all", "topics": DEFAULT_TOPICS})
    chunks, end = await collect(ws, "a", timeout=120)
    assert end["reason"] == "complete", end
    data = [c["data"] for c in chunks]
    assert [d["section"] for d in data] == ["sentence"] * 3 + ["topics", "summary", "aggregate"]
    final = data[-1]
    assert final["sentiment"]["label"] in ("positive", "neutral", "negative") and final["entities"]["PERSON"] >= 2
    assert final["topic"] in DEFAULT_TOPICS and final["summary"]
    await ws.close()


@pytest.mark.parametrize("kind", ["sentiment", "entity"])
async def test_a_stream_going_on_at_chunk_n_sends_the_uninterrupted_runs_chunks_from_n(channel: AnalysisChannel, kind: str) -> None:
    params = {"content": NEWS, "analysis_type": kind}
    whole = await run(channel, params)
    assert channel.restarts(channel.parse(params)) and len(whole) == 4
    await assert_goes_on_from_every_chunk(channel, params, whole)


@pytest.mark.parametrize("kind", ["topic", "summary", "all"])
def test_embedding_sections_do_not_restart(channel: AnalysisChannel, kind: str) -> None:
    assert not channel.restarts(channel.parse({"content": NEWS, "analysis_type": kind}))
