"""Analysis throughput: N documents analysed (`analysis_type` all) over the WebSocket, concurrently and one at a time.

One real server (`python -m streamplex.server`, the MiniLM embedding model on) serves both runs, one after the other:
- `one at a time`: each document is subscribed after the previous one ended, so the engine embeds one
  document's sentences (and topic labels) per step;
- `concurrent`: all N streams are subscribed at once on one WebSocket, so the engine batches the sentences
  of many documents into each step (up to `STREAMPLEX_ENGINE_BATCH_ITEMS`).

Reports documents/s for both, the ratio, the engine's embedding steps and mean batch, and whether every
document's results (topics, summary, entities, sentiment) are the same in both runs.
Example: `python bench/analysis.py --docs 32`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.serverproc import ServerProc, collect, connect, send, start_server  # noqa: E402

PARAGRAPHS = [
    "The city council approved a new budget on Tuesday after a long debate. Mayor Linda Torres said the plan would fund "
    "more buses and repair old bridges. Opposition members argued that property taxes would rise too quickly. "
    "The vote passed by seven to four. Residents will see the first changes next spring.",
    "Shares of Northwind Corporation fell sharply after the company missed its quarterly earnings forecast. "
    "Analysts at Morgan Stanley cut their price target and warned about weak demand in Europe. "
    "The chief executive promised to reduce costs and close two factories in Ohio. Investors remained nervous.",
    "Researchers at the University of Oslo discovered a new species of frog in the rainforest of Borneo. "
    "The tiny animal is smaller than a fingernail and sings at night. The team used acoustic sensors to find it. "
    "Scientists hope the discovery will help protect the forest from logging.",
    "The national team won the championship final with a dramatic goal in extra time. "
    "Thousands of fans celebrated in the streets of Madrid until morning. The coach praised his young striker, "
    "who scored twice in the tournament. It was the first title for the country in twenty years.",
    "A powerful storm brought heavy rain and strong winds to the coast on Sunday. Several roads were flooded and "
    "thousands of homes lost power. Emergency services rescued a family trapped in their car. "
    "Forecasters expect calmer weather by Wednesday.",
    "The new smartphone from Apple features a faster chip and a better camera. Reviewers praised the battery life "
    "but criticised the high price. The device goes on sale in New York, London and Tokyo next Friday. "
    "Early orders have already exceeded expectations.",
    "Doctors are warning about a rise in flu cases this winter. Hospitals in Chicago reported longer waiting times "
    "in emergency rooms. Health officials urged older people to get vaccinated as soon as possible. "
    "Washing hands often also reduces the spread of the virus.",
    "The museum opened a new exhibition of paintings by Vincent van Gogh. Visitors queued for hours to see the "
    "famous sunflowers. The curator said the collection had never been shown together before. "
    "Tickets are sold out for the next three months, but the gallery will stay open late on Fridays.",
]


def documents(n: int) -> list[str]:
    """N distinct documents of two paragraphs each (about ten sentences)."""
    k = len(PARAGRAPHS)
    pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
    return [PARAGRAPHS[i] + "\n\n" + PARAGRAPHS[j] for i, j in pairs[:n]]


def comparable(result: dict[str, Any]) -> dict[str, Any]:
    """The aggregate without its timing."""
    return {k: v for k, v in result.items() if k != "duration_ms"}


async def analyse(ws: Any, stream_id: str, text: str) -> dict[str, Any]:
    chunks, end = await collect(ws, stream_id, timeout=600)
    if end["reason"] != "complete":
        raise RuntimeError(f"{stream_id} ended with {end}")
    return chunks[-1]["data"]


async def one_at_a_time(server: ServerProc, docs: list[str]) -> tuple[float, list[dict[str, Any]]]:
    ws = await connect(server)
    results = []
    started = time.perf_counter()
    for i, text in enumerate(docs):
        await send(ws, op="subscribe", id=f"s{i}", channel="analysis", params={"content": text, "analysis_type": "all"})
        results.append(await analyse(ws, f"s{i}", text))
    elapsed = time.perf_counter() - started
    await ws.close()
    return elapsed, results


async def concurrent(server: ServerProc, docs: list[str]) -> tuple[float, list[dict[str, Any]]]:
    ws = await connect(server)
    started = time.perf_counter()
    for i, text in enumerate(docs):
        await send(ws, op="subscribe", id=f"c{i}", channel="analysis", params={"content": text, "analysis_type": "all"})
    pending: dict[str, dict[str, Any]] = {}
    while len(pending) < len(docs):
        frame = orjson.loads(await asyncio.wait_for(ws.recv(), 600))
        if frame["op"] == "chunk" and frame["data"].get("section") == "aggregate":
            pending[frame["id"]] = frame["data"]
        elif frame["op"] in ("error",) or (frame["op"] == "end" and frame["reason"] != "complete"):
            raise RuntimeError(f"stream failed: {frame}")
    elapsed = time.perf_counter() - started
    await ws.close()
    return elapsed, [pending[f"c{i}"] for i in range(len(docs))]


def embedding_figures(server: ServerProc) -> tuple[float, float]:
    labels = 'model="all-minilm-l6-v2",runner="embedding"'
    steps = server.metric("streamplex_engine_steps_total", labels)
    items = server.metric("streamplex_engine_items_total", labels)
    return steps, items


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=32, help="documents (= concurrent streams in the concurrent run)")
    args = parser.parse_args()
    docs = documents(args.docs)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp), embedding_model="all-minilm-l6-v2")
        try:
            for _ in range(1200):
                if orjson.loads(server.get("/ready")[1])["channels"]["analysis"] == "available":
                    break
                await asyncio.sleep(0.1)
            warm = await connect(server)
            await send(warm, op="subscribe", id="warm", channel="analysis", params={"content": PARAGRAPHS[0], "analysis_type": "all"})
            await analyse(warm, "warm", PARAGRAPHS[0])
            await warm.close()
            runs = []
            for name, fn in (("one at a time", one_at_a_time), ("concurrent", concurrent)):
                steps0, items0 = embedding_figures(server)
                elapsed, results = await fn(server, docs)
                steps1, items1 = embedding_figures(server)
                runs.append((name, elapsed, results, steps1 - steps0, items1 - items0))
        finally:
            server.stop()
    sentences = sum(r["sentences"] for r in runs[0][2])
    print(f"{args.docs} documents, {sentences} sentences, analysis_type all (sentiment, entities, {len(runs[0][2][0]['keywords'])} keywords, topics, summary)")
    print("| run | seconds | documents/s | x one at a time | embedding steps | mean items per step |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = args.docs / runs[0][1]
    for name, elapsed, _, steps, items in runs:
        rate = args.docs / elapsed
        print(f"| {name} | {elapsed:.2f} | {rate:.2f} | {rate / base:.2f} | {steps:.0f} | {items / max(steps, 1):.1f} |")
    same = sum(comparable(a) == comparable(b) for a, b in zip(runs[0][2], runs[1][2], strict=True))
    print(f"results equal between the runs: {same}/{args.docs}")


if __name__ == "__main__":
    asyncio.run(main())
