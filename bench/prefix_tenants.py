"""Time to first token with the per-key prefix cache: does another key's prompt make yours faster?

One in-process engine around the bundled chat model (float32 on the CPU unless STREAMPLEX_DEVICE says
otherwise). For each of `--trials` fresh prompts (a long shared document plus a random question, so
each prompt is new to the cache):

- `first`: key A sends it (nothing of A's kept but the template's system prompt from earlier trials);
- `other key`: key B sends the identical prompt just after (a shared cache would serve it from A's entry);
- `same key`: key A sends it again (served from A's own entry).

Prints the median time to first token of each, as a ratio to `first`, and the prefix-cache hits and
tokens saved. With the cache per key, `other key` is about 1.0 (no signal) and `same key` well under it.
Example: `python bench/prefix_tenants.py --trials 8`.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamplex.server.engine import GenerationRequest, SamplingParams  # noqa: E402
from tests.chatmodel import bundled_runner, engine_with  # noqa: E402

DOCUMENT = " ".join(f"Paragraph {i}: the lighthouse keeper logged the weather, the passing ships and the state of the lamp." for i in range(12))


async def ttft(engine, runner, ids: list[int], tenant: str) -> float:  # type: ignore[no-untyped-def]
    """Seconds from submitting the prompt to its first token."""
    start = time.perf_counter()
    stream = engine.submit(runner.name, len(ids), 1, GenerationRequest(ids, 1, SamplingParams(), tenant=tenant))
    async with stream:
        while (update := await stream.next()) is not None:
            if update.tokens:
                return time.perf_counter() - start
    raise RuntimeError("no token")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()
    runner = bundled_runner()
    runner.prefixes.clear()
    figures: dict[str, list[float]] = {"first": [], "other key": [], "same key": []}
    async with engine_with(runner, max_batch=8, step_tokens=1024, prefill_chunk=512) as engine:
        warm = runner.encode_chat([{"role": "user", "content": "warm up"}])
        for tenant in ("A", "B"):
            await ttft(engine, runner, warm, tenant)  # each key's cache holds the template's system prompt
        hits, saved = runner.prefixes.hits, runner.prefixes.saved
        for _ in range(args.trials):
            ids = runner.encode_chat([{"role": "user", "content": f"{DOCUMENT}\nQuestion {secrets.token_hex(4)}: what did the keeper log?"}])
            figures["first"].append(await ttft(engine, runner, ids, "A"))
            figures["other key"].append(await ttft(engine, runner, ids, "B"))
            figures["same key"].append(await ttft(engine, runner, ids, "A"))
    base = statistics.median(figures["first"])
    print(f"prompt: {len(ids)} tokens; {args.trials} trials; device {runner.device}")
    for name, values in figures.items():
        median = statistics.median(values)
        print(f"{name:>10}: median time to first token {median * 1000:7.1f} ms  ({median / base:.2f} x first)")
    print(f"prefix-cache hits {runner.prefixes.hits - hits}, tokens saved {runner.prefixes.saved - saved} over {3 * args.trials} requests")


if __name__ == "__main__":
    asyncio.run(main())
