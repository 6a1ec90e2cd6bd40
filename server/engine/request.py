"""What a client asks the chat runner for: prompt tokens, a token limit, sampling settings. No torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Temperature 0 is greedy; `top_k` 0 and `top_p` 1 turn those filters off; `seed` makes sampling repeatable."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation: the prompt's token ids, at most `max_new` new tokens, extra stop token ids, and its tenant:
    the API key (its label) whose part of the prefix cache the prompt may use and fill, so that no tenant's time to
    first token depends on another's prompts."""

    prompt: list[int]
    max_new: int
    sampling: SamplingParams = SamplingParams()
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    tenant: str = ""
