"""Where the chat runner's step time goes: N streams through an in-process engine, the step thread under cProfile.

Prints the run's throughput, the engine's own step figures (steps, mean rows and tokens per step, mean
step time, the share of the run's wall time spent inside steps), then the profile's top functions by
own time. On a GPU, a step whose time is mostly Python (module calls, tensor creation) rather than
kernels is bound by the host, not the device. Example: `python bench/engine_profile.py --streams 64`.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from chat import prompts, through_engine  # noqa: E402

from streamplex.server.config import Settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per stream (greedy)")
    parser.add_argument("--arrival-ms", type=float, default=50.0, help="gap between stream arrivals")
    parser.add_argument("--top", type=int, default=30, help="functions to list")
    args = parser.parse_args()

    from streamplex.server.engine import causal_lm

    profile = cProfile.Profile()
    steps: list[tuple[float, int]] = []
    execute = causal_lm.CausalLMRunner.execute

    def profiled(self: Any, plan: Any) -> Any:
        started = time.perf_counter()
        profile.enable()
        try:
            return execute(self, plan)
        finally:
            profile.disable()
            steps.append((time.perf_counter() - started, plan.tokens))

    causal_lm.CausalLMRunner.execute = profiled  # type: ignore[method-assign]
    settings = Settings(asr_model="", embedding_model="", translation_model="")
    result = asyncio.run(through_engine(settings, prompts(args.streams), args.tokens, args.arrival_ms / 1000))
    row = result.row(None)
    busy = sum(s for s, _ in steps)
    print({k: v for k, v in row.items() if v is not None})
    print(
        f"steps: {len(steps)}, mean step {1000 * busy / len(steps):.1f} ms, mean tokens per step {sum(t for _, t in steps) / len(steps):.1f}, "
        f"inside steps {busy:.2f} s of {result.seconds:.2f} s wall (warm-up stream included in steps)"
    )
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())


if __name__ == "__main__":
    main()
