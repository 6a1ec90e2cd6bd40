"""Per-step cost of the chat runner for each CPU weight format: decode steps at several batch sizes and prefill.

Drives `CausalLMRunner.execute` directly (no scheduler, no server): for a batch of B prompts, one step
prefills them all (packed), then `--steps` decode steps run over the B rows. Formats are interleaved
(every repetition runs each format at each batch size, in a rotating order) so that load from other
work on the machine hits them alike; the table gives medians over repetitions. Also prints the machine's
read bandwidth (summing a float32 tensor the size of the model), whether each format's greedy tokens of
row 0 are the same at every batch size as alone, the load (and quantization) time, and with
`--profile` the top operators of one batch-1 decode step under torch.profiler.

Example: `python bench/chat_step.py --batches 1,4,16,64 --reps 3 --profile`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from chat import prompts  # noqa: E402

from streamplex.server.config import Settings  # noqa: E402
from streamplex.server.engine.causal_lm import CausalLMRunner  # noqa: E402
from streamplex.server.engine.cpu_weights import Float16Linear, replace_linear  # noqa: E402
from streamplex.server.engine.device import cpu_threads  # noqa: E402
from streamplex.server.engine.loading import BUNDLED  # noqa: E402
from streamplex.server.engine.request import GenerationRequest, SamplingParams  # noqa: E402
from streamplex.server.engine.scheduler import Chunk, StepPlan  # noqa: E402


class Int8Linear(torch.nn.Module):
    """Weight-only int8 (one scale per output channel, symmetric) through `aten._weight_int8pack_mm`, as gpt-fast on CPU;
    activations bfloat16 (its float32 path measured 10-100x slower than MKL here)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16).contiguous())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.weight, self.scale)
        return out.reshape(*x.shape[:-1], self.out_features)


def build(name: str, threads: int) -> CausalLMRunner:
    """A loaded runner for one format (the prefix cache off: every prompt is prefilled whole).

    `float32` and `float16` are the runner's settings; `bfloat16` is `STREAMPLEX_DTYPE=bfloat16` (activations and KV
    cache too); `int8` is `Int8Linear` in a bfloat16 model; `dynamic-int8` is torch.ao's dynamic quantization with
    qint8 (fbgemm int8 kernels, activations quantized per tensor over the whole batch at every call).
    """
    dtype = torch.bfloat16 if name in ("bfloat16", "int8") else torch.float32
    weights = name if name in ("float32", "float16") else "float32"
    runner = CausalLMRunner(BUNDLED, Settings().cache_dir, torch.device("cpu"), torch.float32, threads, 0, weights=weights)
    started = time.perf_counter()
    runner.load()
    if name == "int8":
        runner.model = replace_linear(runner.model, Int8Linear)
    if name == "dynamic-int8":
        runner.model = torch.ao.quantization.quantize_dynamic(runner.model, {torch.nn.Linear}, dtype=torch.qint8)
    if dtype == torch.bfloat16:
        runner.model = runner.model.to(dtype)
        runner.dtype = dtype
        runner.reset()  # KV blocks in bfloat16
    runner.load_seconds = time.perf_counter() - started
    return runner


def run(runner: CausalLMRunner, ids: list[list[int]], steps: int) -> tuple[float, list[float], list[int]]:
    """(prefill seconds, decode step seconds, row 0's greedy tokens) for one batch."""
    runner.reset()
    plan = StepPlan(admit={i: GenerationRequest(p, 10_000, SamplingParams()) for i, p in enumerate(ids)})
    plan.prefill = [Chunk(i, 0, len(p), True) for i, p in enumerate(ids)]
    started = time.perf_counter()
    outputs = runner.execute(plan)
    prefill = time.perf_counter() - started
    first = [o.token for o in outputs if o.seq_id == 0]
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        outputs = runner.execute(StepPlan(decode=list(runner._rows)))
        times.append(time.perf_counter() - started)
        first += [o.token for o in outputs if o.seq_id == 0]
    runner.reset()
    return prefill, times, [t for t in first if t is not None]


def bandwidth(nbytes: int, reps: int = 5) -> float:
    """GB/s of summing a float32 tensor of `nbytes` (best of `reps`), the rate a step can read weights at."""
    x = torch.ones(nbytes // 4)
    best = min(_timed(x.sum) for _ in range(reps))
    return nbytes / best / 1e9


def _timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def weight_bytes(runner: CausalLMRunner) -> int:
    """Bytes a decode step of a few rows reads: every parameter and buffer (fbgemm's packed weights: their float16 copy,
    or for dynamic int8 their int8 one), less the input embedding unless it is also the output projection."""
    model = runner.model
    embedding = model.get_input_embeddings().weight
    output = getattr(model.get_output_embeddings(), "weight", None)
    fp16 = [m for m in model.modules() if isinstance(m, Float16Linear)]
    skip = {id(m.weight) for m in fp16} | ({id(embedding)} if output is not embedding else set())
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in skip}
    packed = [m.weight() for m in model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    return sum(t.numel() * t.element_size() for t in [*tensors.values(), *packed]) + sum(2 * m.weight.numel() for m in fp16)


def profile_step(name: str, runner: CausalLMRunner, ids: list[int], top: int) -> None:
    """torch.profiler over batch-1 decode steps: operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    runner.reset()
    runner.execute(StepPlan(admit={0: GenerationRequest(ids, 10_000, SamplingParams())}, prefill=[Chunk(0, 0, len(ids), True)]))
    for _ in range(3):
        runner.execute(StepPlan(decode=[0]))
    steps = 5
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            runner.execute(StepPlan(decode=[0]))
        wall = (time.perf_counter() - started) / steps
    runner.reset()
    events = prof.key_averages()
    total_calls = sum(e.count for e in events if e.key.startswith("aten::")) / steps
    print(f"\nprofile, {name}, batch 1 decode: {1000 * wall:.1f} ms a step under the profiler, {total_calls:.0f} aten calls a step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=top))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="float32,bfloat16,int8,float16,dynamic-int8")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--steps", type=int, default=10, help="decode steps timed per batch")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="torch.profiler over batch-1 decode steps of each format")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    threads = cpu_threads(args.threads)
    torch.set_num_threads(threads)
    formats = args.formats.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    print(f"load average at start: {os.getloadavg()}, threads {threads}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")
    runners = {name: build(name, threads) for name in formats}
    texts = prompts(max(batches))
    first = next(iter(runners.values()))
    ids = [first.encode_chat([{"role": "user", "content": t}]) for t in texts]
    for name, runner in runners.items():
        print(f"{name}: load {runner.load_seconds:.1f} s, {weight_bytes(runner) / 1e6:.0f} MB of weights read per decode step")
    print(f"read bandwidth (sum of {weight_bytes(first) / 1e6:.0f} MB): {bandwidth(weight_bytes(first)):.1f} GB/s")
    for runner in runners.values():  # warm-up: first calls allocate and pick kernels
        run(runner, ids[:4], 2)

    prefill: dict[tuple[str, int], list[float]] = {}
    decode: dict[tuple[str, int], list[float]] = {}
    tokens: dict[tuple[str, int], list[int]] = {}
    for rep in range(args.reps):
        order = formats[rep % len(formats) :] + formats[: rep % len(formats)]
        for batch in batches:
            for name in order:
                p, times, toks = run(runners[name], ids[:batch], args.steps)
                prefill.setdefault((name, batch), []).append(p)
                decode.setdefault((name, batch), []).append(statistics.median(times))
                tokens[(name, batch)] = toks
        print(f"rep {rep + 1} done, load average {os.getloadavg()}")

    print("\nmedian over repetitions; decode: ms per step (median of the steps); prefill: ms for the batch's prompts packed in one step")
    head = "| format | " + " | ".join(f"decode b{b}" for b in batches) + " | " + " | ".join(f"prefill b{b}" for b in batches) + " | row 0 same at every batch |"
    print(head)
    print("|" + " --- |" * (2 * len(batches) + 2))
    for name in formats:
        dec = [statistics.median(decode[(name, b)]) * 1000 for b in batches]
        pre = [statistics.median(prefill[(name, b)]) * 1000 for b in batches]
        same = all(tokens[(name, b)] == tokens[(name, batches[0])] for b in batches)
        print(f"| {name} | " + " | ".join(f"{d:.1f}" for d in dec) + " | " + " | ".join(f"{p:.0f}" for p in pre) + f" | {same} |")
    base = formats[0]
    print(f"\nratio to {base} (decode step time; < 1 is faster)")
    for name in formats[1:]:
        ratios = [statistics.median(decode[(name, b)]) / statistics.median(decode[(base, b)]) for b in batches]
        print(f"{name}: " + ", ".join(f"b{b} {r:.2f}" for b, r in zip(batches, ratios, strict=True)))
    for name in formats:
        print(f"{name} row 0 tokens at b{batches[0]}: {tokens[(name, batches[0])]}")
    if args.profile:
        for name, runner in runners.items():
            profile_step(name, runner, ids[0], args.top)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
