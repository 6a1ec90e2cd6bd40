"""The live transcription loop's own cost, without decoding: CPU seconds per second of pushed silent audio.

Silence is never decoded with voice-activity detection on, so what this measures is the channel's loop around the
model: taking the audio (one 32 ms frame at a time since live streams go on across nodes), the Silero VAD scoring
it, cutting the buffer, and (with `--saves`) building the state a stream saves every second of audio. The audio is
pushed all at once as 100 ms frames into the channel's inbox, in this process (no socket), and the stream's CPU time
(`time.process_time`, this process only) is divided by the audio's length. Example:
`python bench/transcription_loop.py --seconds 120 --rounds 3`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from streamplex.channels.transcription import TranscriptionChannel
from streamplex.server.broker import MemoryBroker
from streamplex.server.channel import END_OF_INPUT, Services, StreamContext
from streamplex.server.config import Settings
from streamplex.server.hub import Hub
from streamplex.server.logbuffer import RingLogHandler
from tests.asrmodel import bundled_whisper, engine_with

FRAME = 3200  # 100 ms of 16 kHz s16le


async def one_round(channel: TranscriptionChannel, seconds: int, saves: bool) -> tuple[float, int]:
    """CPU seconds for `seconds` of silence through one stream, and the states it saved."""
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    for _ in range(seconds * 10):
        inbox.put_nowait(bytes(FRAME))
    inbox.put_nowait(END_OF_INPUT)
    saved: list[int] = []

    def saver(input_from: int, state: Any) -> None:
        state()
        saved.append(input_from)

    ctx = StreamContext("bench", inbox, **({"saver": saver} if saves else {}))
    params = channel.parse({"language": "en", "vad": True})
    started = time.process_time()
    chunks = [chunk async for chunk in channel.stream(params, ctx)]
    assert chunks[-1]["type"] == "transcript", chunks
    return time.process_time() - started, len(saved)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=120, help="seconds of audio per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-saves", action="store_true", help="only the rounds without saved states (also runs on code from before them)")
    args = parser.parse_args()
    settings = Settings(api_keys="k", asr_model="")
    async with engine_with(bundled_whisper()) as engine:
        services = Services(settings=settings, feeds=Hub(MemoryBroker()), logs=RingLogHandler(10, "bench"), stats=dict, engine=engine)
        channel = TranscriptionChannel(services)
        for saves in (False,) if args.no_saves else (False, True):
            rounds = [await one_round(channel, args.seconds, saves) for _ in range(args.rounds)]
            cpu = sorted(r[0] for r in rounds)
            print(
                f"saves={'on ' if saves else 'off'} {args.seconds} s of silence x {args.rounds}: "
                f"CPU per audio second min {1000 * cpu[0] / args.seconds:.2f} ms, median {1000 * cpu[len(cpu) // 2] / args.seconds:.2f} ms; "
                f"states saved per round {rounds[0][1]}"
            )


if __name__ == "__main__":
    asyncio.run(main())
