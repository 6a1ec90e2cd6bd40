"""The `streamplex` command: streams from a terminal, and `streamplex serve` when the server is installed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson

from streamplex.audio import TARGET_RATE, read_wav_s16le
from streamplex.client import Client, Subscription
from streamplex.errors import StreamplexError

DEFAULT_URL = "ws://127.0.0.1:8000/ws"


def _serve(argv: list[str]) -> int:
    """Hand `streamplex serve ...` to the server's own CLI, or say plainly that it is not installed."""
    if importlib.util.find_spec("streamplex.server") is None or importlib.util.find_spec("streamplex.server.cli") is None:
        print(
            "streamplex: `serve` needs the streamplex server, which is not installed in this Python environment.\n"
            "Install the `streamplex` distribution (`pip install .` in the repository root, or `./scripts/setup`); "
            "`streamplex-client` alone only connects to servers.",
            file=sys.stderr,
        )
        return 2
    try:
        server_cli = importlib.import_module("streamplex.server.cli")
    except ModuleNotFoundError as exc:
        print(f"streamplex: the server is installed but cannot start: its dependency {exc.name!r} is missing ({exc})", file=sys.stderr)
        return 2
    server_cli.serve(argv)
    return 0


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _params(pairs: list[str], raw: str | None) -> dict[str, Any]:
    params: dict[str, Any] = orjson.loads(raw) if raw else {}
    if not isinstance(params, dict):
        raise SystemExit("streamplex: --params must be a JSON object")
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"streamplex: -p expects key=value, got {pair!r}")
        try:
            params[key] = orjson.loads(value)
        except orjson.JSONDecodeError:
            params[key] = value  # a bare word is a string
    return params


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}G"


def _metrics_line(m: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(m["time"]))
    mem, net, server = m["memory"], m["network"], m["server"]
    parts = [
        stamp,
        f"cpu {m['cpu']['percent']:5.1f}%",
        f"mem {mem['percent']:4.1f}% ({_gib(mem['used_bytes'])}/{_gib(mem['total_bytes'])})",
        f"net rx {net['recv_bytes_per_s'] / 1024:.1f} KiB/s tx {net['sent_bytes_per_s'] / 1024:.1f} KiB/s",
        f"conns {server['connections']}",
        f"streams {sum(server['streams'].values()) if isinstance(server['streams'], dict) else server['streams']}",
    ]
    for gpu in m.get("gpu", {}).get("devices", []):
        parts.append(f"gpu{gpu.get('index', '')} {gpu.get('utilization_percent', '?')}%")
    return "  ".join(parts)


def _log_line(r: dict[str, Any]) -> str:
    stamp = str(r.get("time", ""))[11:23]  # ISO 8601: keep the time of day
    return f"{stamp} {r.get('level', ''):<8} {r.get('logger', '')}: {r.get('message', '')}"


async def _metrics(client: Client, args: argparse.Namespace) -> None:
    count = 0
    async for chunk in client.subscribe("metrics", interval_ms=args.interval_ms):
        _out((orjson.dumps(chunk.data).decode() if args.json else _metrics_line(chunk.data)) + "\n")
        count += 1
        if args.count and count >= args.count:
            return


async def _logs(client: Client, args: argparse.Namespace) -> None:
    async for chunk in client.subscribe("logs", level=args.level, lines=args.lines, follow=not args.no_follow):
        if chunk.dropped:
            _out(f"... {chunk.dropped} record(s) dropped (reading too slowly)\n")
        _out((orjson.dumps(chunk.data).decode() if args.json else _log_line(chunk.data)) + "\n")


async def _chat(client: Client, args: argparse.Namespace) -> None:
    params: dict[str, Any] = {"message": args.message, "max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.system:
        params["system"] = args.system
    if args.model:
        params["model"] = args.model
    async for chunk in client.subscribe("chat", resume=False, **params):
        data = chunk.data
        if "queued" in data:
            print(f"[queued: {data['queued']} ahead]", file=sys.stderr)
        _out(data.get("delta", ""))
        if "finish_reason" in data:
            _out("\n")
            if data["finish_reason"] != "stop":
                print(f"[finished: {data['finish_reason']}]", file=sys.stderr)


async def _push_paced(sub: Subscription, pcm: bytes, realtime: bool) -> None:
    seconds = 0.1 if realtime else 1.0  # live-like 100 ms frames; bigger ones when pushing as fast as possible
    block = round(TARGET_RATE * seconds) * 2
    start = time.monotonic()
    for i, offset in enumerate(range(0, len(pcm), block)):
        if realtime:
            await asyncio.sleep(max(0.0, start + i * seconds - time.monotonic()))
        await sub.push(pcm[offset : offset + block])
    await sub.end_input()


async def _transcribe(client: Client, args: argparse.Namespace) -> None:
    try:
        pcm = read_wav_s16le(args.file)
    except (OSError, ValueError, EOFError) as exc:
        raise StreamplexError(f"cannot read {args.file}: {exc}") from None
    params: dict[str, Any] = {"partials": not args.no_partials}
    if args.language:
        params["language"] = args.language
    live = sys.stdout.isatty()
    async with client.subscribe("transcription", resume=False, **params) as sub:
        pusher = asyncio.create_task(_push_paced(sub, pcm, not args.fast))
        try:
            async for chunk in sub:
                data = chunk.data
                if data.get("type") == "final":
                    _out(("\r\x1b[K" if live else "") + f"[{data['start']:7.2f} -> {data['end']:7.2f}] {data['text'].strip()}\n")
                elif data.get("type") == "partial" and live:
                    _out(f"\r\x1b[K... {data['text'].strip()}")
                elif data.get("type") == "transcript" and args.full:
                    _out(data["text"].strip() + "\n")
        finally:
            pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pusher


async def _translate(client: Client, args: argparse.Namespace) -> None:
    text = args.text if args.text is not None else sys.stdin.read()
    async for chunk in client.subscribe("translation", resume=False, text=text, source_lang=args.source, target_lang=args.target, backend=args.backend):
        if "delta" in chunk.data:
            _out(chunk.data["delta"])
    _out("\n")


def _analysis_line(d: dict[str, Any]) -> str:
    section = d.get("section")
    if section == "sentence":
        sentiment = d.get("sentiment") or {}
        entities = ", ".join(f"{e['text']} ({e['label']})" for e in d.get("entities", []))
        mood = f"{sentiment.get('label', '')} {sentiment.get('compound', '')}".strip()
        return f"#{d['index']} [{mood}] {d['text'].strip()}" + (f"  entities: {entities}" if entities else "")
    if section == "topics":
        return (
            "topics: "
            + ", ".join(f"{t['label']} {t['score']:.2f}" for t in d["topics"][:5])
            + "; keywords: "
            + ", ".join(k["keyword"] for k in d.get("keywords", []))
        )
    if section == "summary":
        return f"summary: {d['summary']}"
    if section == "aggregate":
        return f"overall: {(d.get('sentiment') or {}).get('label', '-')}; entities {d.get('entities', {})}; topic {d.get('topic', '-')}"
    return orjson.dumps(d).decode()


async def _analyze(client: Client, args: argparse.Namespace) -> None:
    content = args.text if args.text is not None else sys.stdin.read()
    async for chunk in client.subscribe("analysis", resume=False, content=content, analysis_type=args.type):
        _out((orjson.dumps(chunk.data).decode() if args.json else _analysis_line(chunk.data)) + "\n")


async def _text(client: Client, args: argparse.Namespace) -> None:
    source = {"document": args.document} if args.document else {"text": args.text if args.text is not None else sys.stdin.read()}
    async for chunk in client.subscribe("text", resume=False, unit=args.unit, chunk_size=args.chunk_size, interval_ms=args.interval_ms, **source):
        _out(chunk.data)


async def _data(client: Client, args: argparse.Namespace) -> None:
    params: dict[str, Any] = {"format": args.format, "chunk_size": args.chunk_size}
    if args.dataset:
        params["dataset"] = args.dataset
    else:
        params["records"] = orjson.loads(args.records if args.records is not None else sys.stdin.read())
    if args.columns:
        params["columns"] = args.columns.split(",")
    async for chunk in client.subscribe("data", resume=False, **params):
        _out(chunk.data)


async def _stream(client: Client, args: argparse.Namespace) -> None:
    async for chunk in client.subscribe(args.channel, resume=False, **_params(args.param, args.params)):
        if chunk.binary:
            if args.binary_out:
                args.binary_out.write(chunk.data)
                args.binary_out.flush()
            else:
                _out(orjson.dumps({"seq": chunk.seq, "bytes": len(chunk.data)}).decode() + "\n")
        else:
            _out(orjson.dumps({"seq": chunk.seq, "data": chunk.data} | ({"dropped": chunk.dropped} if chunk.dropped else {})).decode() + "\n")


async def _channels(client: Client, args: argparse.Namespace) -> None:
    for c in client.ready.get("channels", []):
        extra = f" ({c['reason']})" if c.get("reason") else ""
        _out(f"{c['name']:<14} {c['status']:<12} {c['summary']}{extra}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand but `serve` (which the server's CLI parses)."""
    parser = argparse.ArgumentParser(
        prog="streamplex", description="Stream from a streamplex server. `streamplex serve --help` runs the server (when installed)."
    )
    parser.add_argument("--url", default=os.environ.get("STREAMPLEX_URL", DEFAULT_URL), help="the server's WebSocket URL (env STREAMPLEX_URL)")
    parser.add_argument("--api-key", default=os.environ.get("STREAMPLEX_API_KEY"), help="API key (default: env STREAMPLEX_API_KEY)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("serve", help="run the server (needs the server package); flags go to it")
    sub.add_parser("channels", help="list the channels and their status").set_defaults(run=_channels)

    p = sub.add_parser("metrics", help="machine and server metrics, one line per sample")
    p.add_argument("--interval-ms", type=int, default=1000)
    p.add_argument("--count", type=int, default=0, help="stop after this many samples (0: run until Ctrl-C)")
    p.add_argument("--json", action="store_true", help="print each sample as JSON")
    p.set_defaults(run=_metrics)

    p = sub.add_parser("logs", help="the server's log records, then live")
    p.add_argument("--level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    p.add_argument("--lines", type=int, default=100, help="recent records to show first")
    p.add_argument("--no-follow", action="store_true", help="stop after the recent records")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_logs)

    p = sub.add_parser("chat", help="ask the chat model; the reply streams as it is generated")
    p.add_argument("message")
    p.add_argument("--system")
    p.add_argument("--model")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(run=_chat)

    p = sub.add_parser("transcribe", help="speech to text: pushes a WAV file at real-time pace; partials update in place, finals print with times")
    p.add_argument("file", type=Path, help="a WAV file (8- or 16-bit PCM; resampled to 16 kHz mono here)")
    p.add_argument("--language", help="spoken language code (default: detected)")
    p.add_argument("--fast", action="store_true", help="push as fast as the server takes it instead of in real time")
    p.add_argument("--no-partials", action="store_true")
    p.add_argument("--full", action="store_true", help="print the whole transcript at the end")
    p.set_defaults(run=_transcribe)

    p = sub.add_parser("translate", help="translate a text (argument or stdin); the translation streams sentence by sentence")
    p.add_argument("text", nargs="?")
    p.add_argument("--source", default="en", help="source language (default en)")
    p.add_argument("--target", default="es", help="target language (default es)")
    p.add_argument("--backend", default="apertium", choices=["apertium", "neural"])
    p.set_defaults(run=_translate)

    p = sub.add_parser("analyze", help="sentiment, entities, topics and summary of a text (argument or stdin), one line per result")
    p.add_argument("text", nargs="?")
    p.add_argument("--type", default="all", choices=["sentiment", "entity", "topic", "summary", "all"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_analyze)

    p = sub.add_parser("text", help="stream a text (argument, stdin, or --document on the server)")
    p.add_argument("text", nargs="?")
    p.add_argument("--document")
    p.add_argument("--unit", default="words", choices=["chars", "words", "sentences", "bytes"])
    p.add_argument("--chunk-size", type=int, default=1)
    p.add_argument("--interval-ms", type=int, default=0)
    p.set_defaults(run=_text)

    p = sub.add_parser("data", help="records as ndjson, json, csv or xml, written to stdout")
    p.add_argument("--dataset", help="a .csv or .jsonl file in the server's data folder")
    p.add_argument("--records", help="inline records as a JSON list (default: read from stdin)")
    p.add_argument("--format", default="ndjson", choices=["ndjson", "json", "csv", "xml"])
    p.add_argument("--columns", help="CSV columns, comma-separated")
    p.add_argument("--chunk-size", type=int, default=100)
    p.set_defaults(run=_data)

    p = sub.add_parser("stream", help="any channel: each chunk as a JSON line (binary chunks summarised or written to --binary-out)")
    p.add_argument("channel")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="a param; VALUE is JSON or a bare string (repeatable)")
    p.add_argument("--params", help="all params as a JSON object")
    p.add_argument("--binary-out", type=argparse.FileType("wb"), help="write binary chunks' payloads to this file (- for stdout)")
    p.set_defaults(run=_stream)
    return parser


async def _run(args: argparse.Namespace, command: Callable[[Client, argparse.Namespace], Coroutine[Any, Any, None]]) -> None:
    async with Client(args.url, args.api_key) as client:
        await command(client, args)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `streamplex` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        raise SystemExit(_serve(argv[1:]))
    args = build_parser().parse_args(argv)
    if not args.api_key:
        print("streamplex: no API key: set STREAMPLEX_API_KEY or pass --api-key", file=sys.stderr)
        raise SystemExit(2)
    try:
        asyncio.run(_run(args, args.run))
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's flush at exit
        raise SystemExit(0) from None
    except StreamplexError as exc:
        print(f"streamplex: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
