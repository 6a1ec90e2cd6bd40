"""The chat runner: a Hugging Face causal LM with continuous batching.

Every step is one forward pass over one row of tokens: a token for each sequence in the shared decode
batch (a KVBlock with per-row positions and a padding mask), then the prompts being prefilled. Prompts
that fit in one chunk are packed together (a block-diagonal mask keeps them apart, positions restart per
prompt); a longer prompt goes chunk by chunk through its own block. `attention.segmented_attention`
routes each part to its block. When a prompt is done its first token is sampled and its keys and values
are copied into the batch, which it leaves (freeing the row) as soon as it finishes or is cancelled.

Prefix cache: the keys and values of recent prompts are kept (`PrefixCache`, bounded in tokens). A new
prompt that starts with the same tokens as a kept one of the same tenant (API key) (every chat prompt
starts with the template's system prompt; a conversation's next turn starts with the previous prompt)
is seeded with them and only its remaining tokens go through the model. Causal attention makes the kept
columns exactly what prefilling those tokens again would give. A prompt never uses another tenant's
entries: a shorter time to first token would tell one tenant that another sent the same prefix.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from streamplex.server.engine import attention, cpu_weights, loading
from streamplex.server.engine.device import use_threads
from streamplex.server.engine.kvcache import KVBlock
from streamplex.server.engine.request import GenerationRequest
from streamplex.server.engine.runner import Runner
from streamplex.server.engine.sampling import make_generator, sample
from streamplex.server.engine.scheduler import Chunk, Output, StepPlan

log = logging.getLogger(__name__)


@dataclass
class _Step:
    """One forward pass being assembled: its tokens, their positions, the segments, and whose logits to keep."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    segments: list[attention.Segment] = field(default_factory=list)
    keep: list[tuple[int, int, tuple[KVBlock, int, int] | None]] = field(default_factory=list)

    def add(self, segment: attention.Segment, tokens: list[int], positions: list[int]) -> int:
        """Append a segment and its tokens; return the index of its first token in the row."""
        begin = len(self.tokens)
        self.segments.append(segment)
        self.tokens += tokens
        self.positions += positions
        return begin


@dataclass(eq=False)
class _Seq:
    request: GenerationRequest
    generator: torch.Generator | None
    prefill: KVBlock | None = None
    cached: int = 0  # leading prompt tokens seeded from the prefix cache
    last: int = 0
    generated: int = 0


class PrefixCache:
    """Keys and values of recent prompts by tenant, least recently used out first, at most `max_tokens` tokens in all.

    A prompt is matched only against its own tenant's entries. The bound is shared, so one tenant's traffic may
    evict another's entries: that says how busy others are, never what they sent.
    """

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.tokens = 0
        self.hits = 0
        self.saved = 0
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], torch.Tensor] = OrderedDict()

    def longest(self, prompt: list[int], tenant: str = "") -> tuple[int, torch.Tensor | None]:
        """The longest prefix of `prompt` that `tenant` has kept, leaving at least its last token to compute: (length, keys and values)."""
        best, found = 0, None
        limit = len(prompt) - 1
        for owner, key in self._entries:
            if owner != tenant:
                continue
            n = 0
            for a, b in zip(key, prompt[:limit], strict=False):
                if a != b:
                    break
                n += 1
            if n > best:
                best, found = n, (owner, key)
        if found is None:
            return 0, None
        self._entries.move_to_end(found)
        self.hits += 1
        self.saved += best
        return best, self._entries[found][:, :, :best]

    def add(self, prompt: list[int], kv: torch.Tensor, tenant: str = "") -> None:
        """Keep a prompt's keys and values for `tenant` (evicting the least recently used entries past the bound)."""
        key = (tenant, tuple(prompt))
        if len(prompt) > self.max_tokens or key in self._entries:
            return
        self._entries[key] = kv
        self.tokens += len(prompt)
        while self.tokens > self.max_tokens:
            (_, old), _ = self._entries.popitem(last=False)
            self.tokens -= len(old)

    def clear(self) -> None:
        self._entries.clear()
        self.tokens = 0


def supported_context(config: Any) -> int:
    """The context length the runner can serve exactly: full attention everywhere, so sliding windows cap it."""
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"} or getattr(config, "attn_logit_softcapping", None):
        raise loading.ModelNotSupported(f"only full-attention models are supported, not layer types {sorted(kinds)} or logit soft-capping")
    context = int(getattr(config, "max_position_embeddings", 2048))
    window = getattr(config, "sliding_window", None)
    return min(context, int(window)) if window else context


class CausalLMRunner(Runner):
    """One chat model. `tokenizer`, `context_length` and `encode_chat` are for the chat channel."""

    family = "chat"

    def __init__(
        self,
        spec: str,
        cache_dir: Path,
        device: torch.device,
        dtype: torch.dtype,
        threads: int,
        prefix_cache_tokens: int = 2048,
        weights: str = "float32",
    ) -> None:
        self.model_name = loading.model_name(spec)
        self.name = f"{self.family}/{self.model_name}"
        self.spec = spec
        self.cache_dir = cache_dir
        self.device = device
        self.threads = threads
        self.dtype = dtype
        self.weights = weights if device.type == "cpu" and dtype == torch.float32 else str(dtype).removeprefix("torch.")
        self.load_seconds = 0.0
        self.model: Any = None
        self.tokenizer: Any = None
        self.context_length = 0
        self.eos_ids: frozenset[int] = frozenset()
        self._seqs: dict[int, _Seq] = {}
        self._rows: list[int] = []
        self._batch: KVBlock | None = None
        self.prefixes = PrefixCache(prefix_cache_tokens)

    def load(self) -> None:
        if self.model is not None:
            return
        if self.device.type == "cpu":
            use_threads(self.threads)
        folder = loading.model_folder(self.spec, self.cache_dir)
        started = time.perf_counter()
        model, tokenizer = loading.load_causal_lm(folder, self.device, self.dtype, attention.NAME)
        model = cpu_weights.apply(model, self.weights)
        self.load_seconds = time.perf_counter() - started
        log.info("%s loaded in %.1f s (%s weights)", self.name, self.load_seconds, self.weights)
        config = model.config
        eos = model.generation_config.eos_token_id
        eos_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self.context_length = supported_context(config)
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.tokenizer = tokenizer
        self.model = model
        self.reset()

    def _new_block(self) -> KVBlock:
        config = self.model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return KVBlock(config.num_hidden_layers, kv_heads, head_dim, self.dtype, self.device)

    def reset(self) -> None:
        self._seqs.clear()
        self._rows.clear()
        self._batch = self._new_block()
        self.prefixes.clear()

    def kv_token_bytes(self) -> int:
        block = self._new_block()
        return 2 * block.layers * block.kv_heads * block.head_dim * block.dtype.itemsize

    def kv_cost(self, reserves: Sequence[int]) -> int:
        """Rows are padded to the longest one, so a batch costs rows x longest reservation."""
        return len(reserves) * max(reserves, default=0)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids for a conversation, through the model's chat template, ending with the assistant's turn."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)

    def describe(self) -> dict[str, Any]:
        threads = {"threads": self.threads} if self.device.type == "cpu" else {}
        return {"model": self.model_name, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."), "weights": self.weights, **threads}

    def stats(self) -> dict[str, Any]:
        batch = self._batch
        return {
            "rows": batch.rows if batch else 0,
            "kv_bytes": batch.nbytes() if batch else 0,
            "prefix_cache_tokens": self.prefixes.tokens,
            "prefix_cache_hits": self.prefixes.hits,
            "prefix_tokens_saved": self.prefixes.saved,
        }

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[Output]:
        if self.device.type == "cpu":
            use_threads(self.threads)
        for seq_id in plan.release:
            self._free(seq_id)
        for seq_id, request in plan.admit.items():
            self._seqs[seq_id] = _Seq(request, make_generator(request.sampling, self.device))
        step = _Step()
        if plan.decode:
            self._add_decode(step, plan.decode)
        for chunk in plan.prefill:
            if chunk.start == 0:
                self._open_prefill(self._seqs[chunk.seq_id], packable=chunk.last)
        whole = [c for c in plan.prefill if c.start == 0 and c.last and self._seqs[c.seq_id].prefill is None]
        if whole:
            self._add_packed(step, whole)
        for chunk in plan.prefill:
            if not (chunk.start == 0 and chunk.last and self._seqs[chunk.seq_id].prefill is None):
                self._add_chunk(step, chunk)
        return self._run(step) if step.tokens else []

    def _free(self, seq_id: int) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is None or seq_id not in self._rows:
            return
        assert self._batch is not None
        row = self._rows.index(seq_id)
        self._batch.remove_row(row)
        self._rows[row] = self._rows[-1]
        self._rows.pop()

    def _add_decode(self, step: _Step, seq_ids: list[int]) -> None:
        batch = self._batch
        assert batch is not None and sorted(seq_ids) == sorted(self._rows), "the decode set must be the batch"
        batch.prepare(1)
        segment = attention.Segment(len(step.tokens), batch, batch.rows, 1, batch.attention_mask(1))
        begin = step.add(segment, [self._seqs[i].last for i in self._rows], batch.lengths())
        step.keep += [(begin + row, seq_id, None) for row, seq_id in enumerate(self._rows)]

    def _add_packed(self, step: _Step, chunks: list[Chunk]) -> None:
        """Whole prompts packed into one row of a fresh block."""
        lengths = [c.length for c in chunks]
        block = self._new_block()
        block.open_single(sum(lengths))
        block.prepare(sum(lengths))
        tokens = [t for c in chunks for t in self._seqs[c.seq_id].request.prompt]
        segment = attention.Segment(len(step.tokens), block, 1, len(tokens), packing=attention.Packing.of(lengths, self.device))
        begin = step.add(segment, tokens, [p for n in lengths for p in range(n)])
        end = 0
        for chunk in chunks:
            end += chunk.length
            step.keep.append((begin + end - 1, chunk.seq_id, (block, end - chunk.length, end)))

    def _open_prefill(self, seq: _Seq, packable: bool) -> None:
        """Give a prompt its own block, seeded from the prefix cache when a kept prompt starts the same way;
        a whole prompt with nothing cached gets none: it is packed with the others instead."""
        prompt = seq.request.prompt
        cached, kv = self.prefixes.longest(prompt, seq.request.tenant) if self.prefixes.max_tokens else (0, None)
        if kv is None and packable:
            return
        seq.prefill = self._new_block()
        seq.prefill.open_single(len(prompt))
        if kv is not None:
            seq.prefill.seed(kv)
            seq.cached = cached

    def _add_chunk(self, step: _Step, chunk: Chunk) -> None:
        """One chunk of a prompt in the sequence's own block, less what the prefix cache already holds."""
        seq = self._seqs[chunk.seq_id]
        block = seq.prefill
        assert block is not None
        start, end = max(chunk.start, seq.cached), chunk.start + chunk.length
        if start >= end:
            return
        length = end - start
        block.prepare(length)
        segment = attention.Segment(len(step.tokens), block, 1, length, block.attention_mask(length))
        begin = step.add(segment, seq.request.prompt[start:end], list(range(start, end)))
        if chunk.last:
            step.keep.append((begin + length - 1, chunk.seq_id, (block, 0, end)))

    def _run(self, step: _Step) -> list[Output]:
        """The step's forward pass, then sampling, then prompts joining the batch."""
        out = self.model(
            input_ids=torch.tensor([step.tokens], device=self.device),
            position_ids=torch.tensor([step.positions], device=self.device),
            use_cache=False,
            logits_to_keep=torch.tensor([index for index, _, _ in step.keep], device=self.device),
            streamplex_segments=step.segments,
        )
        for segment in step.segments:
            segment.block.commit()
        seqs = [self._seqs[seq_id] for _, seq_id, _ in step.keep]
        tokens = sample(out.logits[0], [s.request.sampling for s in seqs], [s.generator for s in seqs])
        outputs = []
        for (_, seq_id, source), seq, token in zip(step.keep, seqs, tokens, strict=True):
            result = self._emit(seq_id, seq, token)
            if source is not None:
                if self.prefixes.max_tokens:
                    self.prefixes.add(seq.request.prompt, source[0].columns(0, source[1], source[2]), seq.request.tenant)
                seq.prefill = None
                if result.done is None:
                    assert self._batch is not None
                    self._batch.add_row(*source)
                    self._rows.append(seq_id)
            outputs.append(result)
        return outputs

    def _emit(self, seq_id: int, seq: _Seq, token: int) -> Output:
        seq.last = token
        seq.generated += 1
        if token in self.eos_ids or token in seq.request.stop_ids:
            return Output(seq_id, token, "stop")
        return Output(seq_id, token, "length" if seq.generated >= seq.request.max_new else None)
