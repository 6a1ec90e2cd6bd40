"""The neural translation runner: a Hugging Face encoder-decoder (Marian opus-mt, M2M100, NLLB) with greedy decoding
of every running sequence in one forward pass per step.

A sequence's source is its "prompt": when the scheduler hands over its last prompt chunk, the runner encodes
the whole source (all sources finishing in a step are encoded in one padded batch, with an attention mask)
and keeps the encoder states. Each step then runs the decoder once over every running sequence: the rows
hold each sequence's decoder prefix plus the tokens generated so far, right-padded, so every row keeps its own
positions from 0 and causal attention never looks at padding; cross-attention masks the padded source. The
decoder prefix is recomputed every step (no self-attention cache): Marian's position embeddings take one
offset for the whole batch, so a shared cache would need every row at the same length. That costs
O(length^2) decoder work per sentence, acceptable for sentence-sized outputs and exact: batched and
one-at-a-time greedy outputs are the same (tests/server/engine/test_seq2seq_runner.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from streamplex.server.engine.device import use_threads
from streamplex.server.engine.runner import Runner
from streamplex.server.engine.scheduler import Output, StepPlan

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MARIAN_NAME = re.compile(r"-([a-z]{2,3})-([a-z]{2,3})$")


@dataclass(frozen=True, slots=True)
class TranslationRequest:
    """Encoder input ids (the tokenizer's, with its end token) and the decoder prefix (start token, target-language token)."""

    source: list[int]
    prefix: list[int]


@dataclass(eq=False)
class _Seq:
    request: TranslationRequest
    encoded: torch.Tensor | None = None
    generated: list[int] = field(default_factory=list)


class Seq2SeqRunner(Runner):
    """One translation model from a local folder. `tokenizer`, `pairs` and `request` are for the translation channel."""

    family = "translation"

    def __init__(self, spec: str, device: torch.device, dtype: torch.dtype, threads: int) -> None:
        self.folder = Path(spec).expanduser()
        self.model_name = self.folder.name
        self.name = f"{self.family}/{self.model_name}"
        self.device = device
        self.dtype = dtype
        self.threads = threads
        self.model: Any = None
        self.tokenizer: Any = None
        self.kind = ""
        self.max_source = 0
        self.max_target = 0
        self.single_pair: tuple[str, str] | None = None
        self._seqs: dict[int, _Seq] = {}

    def load(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if self.device.type == "cpu":
            use_threads(self.threads)
        if not (self.folder / "config.json").is_file():
            raise FileNotFoundError(f"{self.folder} is not a Hugging Face model folder (no config.json)")
        tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        model = AutoModelForSeq2SeqLM.from_pretrained(self.folder, dtype=self.dtype, local_files_only=True)
        config = model.config
        if not config.is_encoder_decoder:
            raise ValueError(f"{self.folder} is not an encoder-decoder model")
        self.kind = config.model_type
        self.max_source = int(getattr(config, "max_position_embeddings", 512))
        self.max_target = self.max_source
        if self.kind == "marian":
            source, target = getattr(tokenizer, "source_lang", None), getattr(tokenizer, "target_lang", None)
            match = MARIAN_NAME.search(self.model_name)
            if not (source and target) and match:
                source, target = match[1], match[2]
            self.single_pair = (source, target) if source and target else None
        self.tokenizer = tokenizer
        self.model = model.to(self.device).eval()

    def describe(self) -> dict[str, Any]:
        threads = {"threads": self.threads} if self.device.type == "cpu" else {}
        return {"model": self.model_name, "kind": self.kind, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."), **threads}

    def stats(self) -> dict[str, Any]:
        return {"rows": len(self._seqs)}

    def kv_token_bytes(self) -> int:
        """Encoder states kept per source token (the decoder keeps no cache)."""
        return int(self.model.config.d_model) * self.dtype.itemsize

    def reset(self) -> None:
        self._seqs.clear()

    def languages(self) -> str:
        """What the model translates, for error messages."""
        if self.single_pair:
            return f"{self.single_pair[0]} -> {self.single_pair[1]}"
        return "the language codes of its tokenizer" if self.kind in ("m2m_100", "nllb", "nllb-moe") else "one fixed pair"

    def target_token(self, target: str) -> int | None:
        """The forced first token for a multilingual model's target language; None if the model has no such code."""
        if self.kind == "m2m_100":
            token = self.tokenizer.lang_code_to_token.get(target) if hasattr(self.tokenizer, "lang_code_to_token") else f"__{target}__"
        else:
            token = target
        token_id = self.tokenizer.convert_tokens_to_ids(token) if token else None
        return None if token_id is None or token_id == self.tokenizer.unk_token_id else int(token_id)

    def request(self, text: str, source: str, target: str) -> TranslationRequest:
        """Encode one sentence; ValueError when the model does not translate source -> target or the sentence is too long."""
        start = int(self.model.config.decoder_start_token_id)
        if self.kind == "marian":
            prefix = [start]
        else:
            forced = self.target_token(target)
            if forced is None or self.target_token(source) is None:
                raise ValueError(f"{self.model_name} has no language code {target if forced is None else source!r}")
            self.tokenizer.src_lang = source
            prefix = [start, forced]
        ids = list(self.tokenizer(text)["input_ids"])
        if len(ids) > self.max_source:
            raise ValueError(f"a sentence of {len(ids)} tokens is longer than the model's {self.max_source}")
        return TranslationRequest(ids, prefix)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[Output]:
        if self.device.type == "cpu":
            use_threads(self.threads)
        for seq_id in plan.release:
            self._seqs.pop(seq_id, None)
        for seq_id, request in plan.admit.items():
            self._seqs[seq_id] = _Seq(request)
        ready = [c.seq_id for c in plan.prefill if c.last and c.seq_id in self._seqs]
        if ready:
            self._encode(ready)
        rows = [i for i in plan.decode if i in self._seqs] + ready
        return self._decode(rows) if rows else []

    def _encode(self, seq_ids: list[int]) -> None:
        sources = [self._seqs[i].request.source for i in seq_ids]
        ids, mask = self._pad(sources)
        states = self.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        for row, seq_id in enumerate(seq_ids):
            self._seqs[seq_id].encoded = states[row, : len(sources[row])]

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and their attention mask."""
        width = max(map(len, rows))
        pad = int(self.model.config.pad_token_id)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _decode(self, seq_ids: list[int]) -> list[Output]:
        from transformers.modeling_outputs import BaseModelOutput

        seqs = [self._seqs[i] for i in seq_ids]
        states: list[torch.Tensor] = []
        for s in seqs:
            assert s.encoded is not None, "a decoding sequence has its encoder states"
            states.append(s.encoded)
        width = max(s.shape[0] for s in states)
        encoded = torch.zeros((len(seqs), width, states[0].shape[-1]), dtype=states[0].dtype, device=self.device)
        source_mask = torch.zeros((len(seqs), width), dtype=torch.long, device=self.device)
        for r, state in enumerate(states):
            encoded[r, : state.shape[0]] = state
            source_mask[r, : state.shape[0]] = 1
        prefixes = [s.request.prefix + s.generated for s in seqs]
        decoder_ids, _ = self._pad(prefixes)
        logits = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoded), attention_mask=source_mask, decoder_input_ids=decoder_ids).logits
        last = logits[torch.arange(len(seqs), device=self.device), torch.tensor([len(p) - 1 for p in prefixes], device=self.device)]
        pad = self.model.config.pad_token_id
        if pad is not None and pad != self.model.config.eos_token_id:
            last[:, pad] = float("-inf")  # padding is never a translation token (opus-mt's generation config bans it too)
        tokens = last.argmax(dim=-1).tolist()
        eos = self.model.config.eos_token_id
        outputs = []
        for seq_id, seq, token in zip(seq_ids, seqs, tokens, strict=True):
            seq.generated.append(int(token))
            full = len(seq.request.prefix) + len(seq.generated) >= self.max_target
            outputs.append(Output(seq_id, int(token), "stop" if token == eos else "length" if full else None))
        return outputs
