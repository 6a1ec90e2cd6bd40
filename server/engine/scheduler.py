"""Which sequences run in the next step of one runner: pure bookkeeping, no torch.

Each step decodes one token for every running sequence that has finished its prompt, then fills the rest
of the step's token budget with prompt chunks (prefill), oldest first. Prompt chunks have a fixed size
(`prefill_chunk`, the last one shorter), so a prompt is split the same way whatever else runs beside it.
A waiting sequence is admitted when a batch slot is free and the runner's KV memory can hold it as
reserved (prompt plus its token limit); until then it keeps its place in a FIFO queue. A sequence of higher
`priority` (a live transcript's final, ahead of its drafts) is queued ahead of lower ones, and a step that
admits it admits no lower one: its prefill never shares a step with theirs.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"


class AdmissionError(Exception):
    """A sequence the scheduler can never run (too large) or cannot queue now (queue full)."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(eq=False)
class Seq:
    """The scheduler's view of one request."""

    id: int
    prompt_len: int
    max_new: int
    payload: Any = None
    priority: int = 0
    phase: Phase = Phase.WAITING
    prefilled: int = 0
    generated: int = 0

    @property
    def reserve(self) -> int:
        """KV cache tokens this sequence may occupy at most."""
        return self.prompt_len + self.max_new


@dataclass(frozen=True, slots=True)
class Chunk:
    """Prompt tokens [start, start + length) of one sequence; `last` completes its prompt."""

    seq_id: int
    start: int
    length: int
    last: bool


@dataclass
class StepPlan:
    """What the runner does in one step, in this order: free, admit, decode, prefill."""

    release: list[int] = field(default_factory=list)
    admit: dict[int, Any] = field(default_factory=dict)
    decode: list[int] = field(default_factory=list)
    prefill: list[Chunk] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Tokens this step feeds the model."""
        return len(self.decode) + sum(c.length for c in self.prefill)

    @property
    def empty(self) -> bool:
        return not (self.release or self.decode or self.prefill)


@dataclass(frozen=True, slots=True)
class Output:
    """One sequence's result from a step: a sampled token, and a finish reason when the runner ends it."""

    seq_id: int
    token: int | None = None
    done: str | None = None


def summed(reserves: Sequence[int]) -> int:
    """KV cost of a layout that stores each sequence in its own space."""
    return sum(reserves)


class Scheduler:
    """Admission, queueing and per-step selection for one runner."""

    def __init__(
        self,
        *,
        max_batch: int,
        step_tokens: int,
        prefill_chunk: int,
        kv_budget: int,
        kv_cost: Callable[[Sequence[int]], int] = summed,
        max_waiting: int = 1024,
    ) -> None:
        if min(max_batch, prefill_chunk, kv_budget) < 1:
            raise ValueError("max_batch, prefill_chunk and kv_budget must be positive")
        if step_tokens < max_batch + prefill_chunk:
            raise ValueError(f"step_tokens ({step_tokens}) must be at least max_batch + prefill_chunk ({max_batch + prefill_chunk})")
        self.max_batch = max_batch
        self.step_tokens = step_tokens
        self.prefill_chunk = prefill_chunk
        self.kv_budget = kv_budget
        self.kv_cost = kv_cost
        self.max_waiting = max_waiting
        self.waiting: deque[Seq] = deque()
        self.running: dict[int, Seq] = {}
        self._release: list[int] = []

    def add(self, seq: Seq) -> None:
        """Queue a sequence; raise AdmissionError if it can never fit or the queue is full."""
        if seq.prompt_len < 1 or seq.max_new < 0:
            raise AdmissionError("a sequence needs at least one prompt token", retryable=False)
        if self.kv_cost([seq.reserve]) > self.kv_budget:
            raise AdmissionError(
                f"prompt ({seq.prompt_len}) plus max tokens ({seq.max_new}) exceed the KV cache budget of {self.kv_budget} tokens",
                retryable=False,
            )
        if len(self.waiting) >= self.max_waiting:
            raise AdmissionError(f"{len(self.waiting)} requests are already queued", retryable=True)
        behind = next((i for i, s in enumerate(self.waiting) if s.priority < seq.priority), len(self.waiting))
        self.waiting.insert(behind, seq)

    def cancel(self, seq_id: int) -> bool:
        """Drop a sequence now; a running one's memory is freed at the start of the next step."""
        for seq in self.waiting:
            if seq.id == seq_id:
                self.waiting.remove(seq)
                seq.phase = Phase.DONE
                return True
        running = self.running.pop(seq_id, None)
        if running is None:
            return False
        running.phase = Phase.DONE
        self._release.append(seq_id)
        return True

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._release)

    def positions(self) -> dict[int, int]:
        """Queue position (1 = next to be admitted) of every waiting sequence."""
        return {seq.id: i for i, seq in enumerate(self.waiting, 1)}

    def reserved(self) -> int:
        """KV tokens reserved by the running sequences, as the runner's layout counts them."""
        return self.kv_cost([s.reserve for s in self.running.values()]) if self.running else 0

    def plan(self) -> StepPlan:
        """Choose the next step's work and move admitted sequences from the queue to the batch."""
        plan = StepPlan(release=self._release)
        self._release = []
        plan.decode = [s.id for s in self.running.values() if s.phase is Phase.DECODE]
        budget = self.step_tokens - len(plan.decode)
        for seq in self.running.values():
            if seq.phase is Phase.PREFILL:
                if not self._take_chunk(plan, seq, budget):
                    return plan
                budget -= plan.prefill[-1].length
        top = self.waiting[0].priority if self.waiting else 0
        while self.waiting and len(self.running) < self.max_batch and self.waiting[0].priority == top:
            seq = self.waiting[0]
            if self.kv_cost([s.reserve for s in self.running.values()] + [seq.reserve]) > self.kv_budget:
                break
            if min(self.prefill_chunk, seq.prompt_len) > budget:
                break
            self.waiting.popleft()
            seq.phase = Phase.PREFILL
            self.running[seq.id] = seq
            plan.admit[seq.id] = seq.payload
            self._take_chunk(plan, seq, budget)
            budget -= plan.prefill[-1].length
        return plan

    def _take_chunk(self, plan: StepPlan, seq: Seq, budget: int) -> bool:
        length = min(self.prefill_chunk, seq.prompt_len - seq.prefilled)
        if length > budget:
            return False
        plan.prefill.append(Chunk(seq.id, seq.prefilled, length, seq.prefilled + length == seq.prompt_len))
        return True

    def commit(self, plan: StepPlan, outputs: Iterable[Output]) -> list[tuple[Seq, Output]]:
        """Apply a step's outputs; return those of sequences still tracked (cancelled ones are dropped)."""
        for chunk in plan.prefill:
            seq = self.running.get(chunk.seq_id)
            if seq is not None:
                seq.prefilled = chunk.start + chunk.length
                if chunk.last:
                    seq.phase = Phase.DECODE
        delivered = []
        for out in outputs:
            seq = self.running.get(out.seq_id)
            if seq is None:
                continue
            if out.token is not None:
                seq.generated += 1
            done = out.done or ("length" if seq.generated >= seq.max_new and seq.phase is Phase.DECODE else None)
            if done:
                self.running.pop(seq.id)
                seq.phase = Phase.DONE
                self._release.append(seq.id)
                out = Output(out.seq_id, out.token, done)
            delivered.append((seq, out))
        return delivered

    def abort_running(self) -> list[Seq]:
        """Drop every running sequence (after a failed step); the runner must reset its own state."""
        dropped = list(self.running.values())
        for seq in dropped:
            seq.phase = Phase.DONE
        self.running.clear()
        self._release = []
        return dropped


class RoundRobin:
    """Picks the next runner with work, in turn, so one busy runner cannot starve another."""

    def __init__(self) -> None:
        self._last = -1

    def pick(self, has_work: Sequence[bool]) -> int | None:
        """Index of the next entry after the last pick that has work, or None."""
        n = len(has_work)
        for k in range(1, n + 1):
            i = (self._last + k) % n
            if has_work[i]:
                self._last = i
                return i
        return None
