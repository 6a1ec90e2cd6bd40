"""The transcription runner: Whisper with truncated encoder input and batched greedy decoding.

Encoder: a window's log-mel input is cut to its real audio plus 1-1.1 s of silence (rounded up to 0.1 s)
and the encoder's position embeddings are sliced to match, as whisper.cpp's `audio_ctx` does. The
encoder's cost is in its length, so a 5 s window costs about an eighth of the standard 30 s one with the
same transcript (the trailing silence keeps the decoder from repeating itself at a hard cut). Windows are
encoded one per call: batching them saves nothing on a CPU, and int8 activations are scaled per call.

Decoder: every window being decoded is one row of a shared block holding its self-attention keys and
values (left-aligned, grown as tokens come) and its cross-attention keys and values (computed once from
its encoder output; rows of shorter audio are masked past their length). One engine step runs one
batched decoder pass over all rows, a token each; a finished window's row is replaced by the last row.
Greedy decoding applies Whisper's token rules (suppressed tokens, timestamp pairing and monotonicity,
timestamps win when their total probability beats any text token), as transformers' `generate` does. Two
rules of its own end a window early, where Whisper would loop to the token limit: a segment that would
start at the audio's end, and a span of tokens said twice in a row (`asr.repeated_tail`).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from streamplex.server.engine import whisper_loading
from streamplex.server.engine.asr import SAMPLE_RATE, WINDOW_SECONDS, TranscriptionRequest, WhisperVocab, repeated_tail
from streamplex.server.engine.device import use_threads
from streamplex.server.engine.runner import Runner
from streamplex.server.engine.scheduler import Output, StepPlan

PAD_SECONDS = 1.0  # silence after the audio, at least; the input is then rounded up to PAD_STEP
PAD_STEP = SAMPLE_RATE // 10  # 0.1 s: 10 mel frames, 5 encoder frames
END_SLACK = 5  # time tokens (0.1 s): a segment starting this close to the audio's end ends the transcript
MAX_TOKENS = 224  # tokens one window may generate (Whisper's own sample length)
COLUMN_GROWTH = 64


def padded_samples(samples: int) -> int:
    """Encoder input length for `samples` of audio: plus PAD_SECONDS, rounded up to PAD_STEP, at most 30 s."""
    steps = math.ceil((samples + PAD_SECONDS * SAMPLE_RATE) / PAD_STEP)
    return min(steps * PAD_STEP, WINDOW_SECONDS * SAMPLE_RATE)


def quantize_for_cpu(model: Any) -> None:
    """Swap Whisper's linear layers, in place, for fbgemm's: int8 in the encoder (and the decoder's cross-attention keys and values), float16 weights in the rest of the decoder.

    On CPU the decoder's step is bound by reading its weights (the output projection alone is 100 MB in float32)
    and the encoder by its matrix products. Int8 halves the encoder's time. Its activations are quantized per
    call, so the encoder runs one window per call and a window's result never depends on another's. The decoder
    keeps float32 activations, so a row decodes the same alone or in a batch.
    """
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch points eager-mode quantization at torchao; the fbgemm kernels stay
        warnings.simplefilter("ignore")
        quantize_dynamic(model.model.encoder, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        cross = {f"layers.{i}.encoder_attn.{name}" for i in range(len(model.model.decoder.layers)) for name in ("k_proj", "v_proj")}
        quantize_dynamic(model.model.decoder, cross, dtype=torch.qint8, inplace=True)  # run once per window, on its encoder output
        quantize_dynamic(model.model.decoder, {torch.nn.Linear}, dtype=torch.float16, inplace=True)
        head = torch.nn.Sequential(model.proj_out)
        quantize_dynamic(head, {torch.nn.Linear}, dtype=torch.float16, inplace=True)
        model.proj_out = head[0]


@dataclass(eq=False)
class _Row:
    """A window in the decode block: its tokens so far (after the prompt) and the rules' state."""

    seq_id: int
    request: TranscriptionRequest
    prompt_len: int
    max_timestamp: int
    generated: list[int]  # the prefix, then the tokens decoded

    def decoded(self) -> list[int]:
        return self.generated[len(self.request.prefix) :]


class _Block:
    """Self- and cross-attention keys and values of the rows being decoded: `[layers, 2, rows, heads, columns, head_dim]`."""

    def __init__(self, layers: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = (layers, 2, 0, heads, 0, head_dim)
        self.dtype, self.device = dtype, device
        self.self_kv: torch.Tensor | None = None
        self.cross_kv: torch.Tensor | None = None
        self.lengths: list[int] = []
        self.enc_lengths: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.self_kv, self.cross_kv) if t is not None)

    @staticmethod
    def _grown(buf: torch.Tensor | None, rows: int, columns: int, like: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        have = (0, 0) if buf is None else (buf.shape[2], buf.shape[4])
        if buf is not None and rows <= have[0] and columns <= have[1]:
            return buf
        rows = max(rows, have[0]) if rows <= have[0] else max(rows, 2 * have[0])
        columns = max(columns, have[1]) if columns <= have[1] else max(columns, have[1] + have[1] // 4)
        layers, two, _, heads, _, dim = like
        new = torch.zeros((layers, two, rows, heads, columns, dim), dtype=dtype, device=device)
        if buf is not None:
            new[:, :, : buf.shape[2], :, : buf.shape[4]] = buf
        return new

    def add(self, cross_kv: torch.Tensor, reserve: int) -> int:
        """Append a row with its cross keys/values `[layers, 2, heads, frames, head_dim]`; return its index."""
        row = self.rows
        frames = cross_kv.shape[3]
        self_cols = max(self.lengths, default=0)
        self.self_kv = self._grown(self.self_kv, row + 1, max(self_cols, reserve), self.shape, self.dtype, self.device)
        self.cross_kv = self._grown(self.cross_kv, row + 1, frames, self.shape, self.dtype, self.device)
        self.cross_kv[:, :, row, :, :frames] = cross_kv
        self.lengths.append(0)
        self.enc_lengths.append(frames)
        return row

    def ensure_columns(self, columns: int) -> None:
        assert self.self_kv is not None
        if columns > self.self_kv.shape[4]:
            self.self_kv = self._grown(self.self_kv, self.rows, columns + COLUMN_GROWTH, self.shape, self.dtype, self.device)

    def remove(self, row: int) -> None:
        """Drop a row by moving the last row into its place."""
        last = self.rows - 1
        if row != last:
            assert self.self_kv is not None and self.cross_kv is not None
            self.self_kv[:, :, row] = self.self_kv[:, :, last]
            self.cross_kv[:, :, row] = self.cross_kv[:, :, last]
            self.lengths[row], self.enc_lengths[row] = self.lengths[last], self.enc_lengths[last]
        self.lengths.pop()
        self.enc_lengths.pop()


class WhisperRunner(Runner):
    """One Whisper model. `vocab` (special tokens, decoding) is for the transcription channel."""

    family = "transcription"

    def __init__(self, spec: str, cache_dir: Path, device: torch.device, dtype: torch.dtype, threads: int, quantize: bool = False) -> None:
        self.model_name = whisper_loading.model_name(spec)
        self.name = f"{self.family}/{self.model_name}"
        self.spec = spec
        self.cache_dir = cache_dir
        self.device = device
        self.dtype = dtype
        self.threads = threads
        self.quantize = quantize and device.type == "cpu"
        self.model: Any = None
        self.features: Any = None
        self.vocab: WhisperVocab | None = None
        self.max_positions = 0
        self._rows: list[_Row] = []
        self._block: _Block | None = None
        self._suppress: torch.Tensor | None = None
        self._begin_suppress: list[int] = []

    def load(self) -> None:
        if self.model is not None:
            return
        if self.device.type == "cpu":
            use_threads(self.threads)
        from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        folder = whisper_loading.model_folder(self.spec, self.cache_dir)
        model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=self.dtype, local_files_only=True)
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]  # transformers' stubs type `.to` for a model instance only
        if self.quantize:
            quantize_for_cpu(self.model)
        self.features = WhisperFeatureExtractor.from_pretrained(folder, local_files_only=True)
        config, generation = model.config, model.generation_config
        self.vocab = WhisperVocab(folder / "tokenizer.json", multilingual=config.vocab_size >= 51865)
        self.max_positions = config.max_target_positions
        suppress = torch.zeros(config.vocab_size, dtype=torch.bool, device=self.device)
        suppress[list(generation.suppress_tokens or config.suppress_tokens or [])] = True
        self._suppress = suppress
        self._begin_suppress = list(generation.begin_suppress_tokens or config.begin_suppress_tokens or [])
        heads = config.decoder_attention_heads
        self._block = _Block(config.decoder_layers, heads, config.d_model // heads, self.dtype, self.device)

    def reset(self) -> None:
        self._rows.clear()
        if self._block is not None:
            self._block = _Block(*self._block.shape[0:1], self._block.shape[3], self._block.shape[5], self.dtype, self.device)

    def max_new_tokens(self, prompt_len: int) -> int:
        """Tokens a window with this prompt may generate."""
        return max(0, min(MAX_TOKENS, self.max_positions - prompt_len))

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "device": self.device.type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "threads": self.threads,
            "linear_weights": "encoder int8, decoder float16" if self.quantize else str(self.dtype).removeprefix("torch."),
        }

    def stats(self) -> dict[str, Any]:
        block = self._block
        return {"rows": block.rows if block else 0, "kv_bytes": block.nbytes() if block else 0}

    def kv_token_bytes(self) -> int:
        config = self.model.config
        return 2 * config.decoder_layers * config.d_model * torch.finfo(self.dtype).bits // 8

    # one step

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[Output]:
        if self.device.type == "cpu":
            use_threads(self.threads)
        for seq_id in plan.release:
            self._drop(seq_id)
        outputs = self._decode() if plan.decode else []
        ready = [(c.seq_id, plan.admit.get(c.seq_id)) for c in plan.prefill if c.last]
        if ready:
            outputs += self._prefill([(seq_id, request) for seq_id, request in ready if request is not None])
        return outputs

    def _drop(self, seq_id: int) -> None:
        for i, row in enumerate(self._rows):
            if row.seq_id == seq_id:
                assert self._block is not None
                self._block.remove(i)
                self._rows[i] = self._rows[-1]
                self._rows.pop()
                return

    def encode(self, audios: list[Any]) -> torch.Tensor:
        """Encoder output `[batch, frames, d_model]` for equally long windows of 16 kHz float32 audio (already padded)."""
        features = self.features(audios, sampling_rate=SAMPLE_RATE, padding="longest", return_tensors="pt").input_features
        encoder = self.model.model.encoder
        x = features.to(self.device, self.dtype)
        x = F.gelu(encoder.conv1(x))
        x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
        x = x + encoder.embed_positions.weight[: x.shape[1]]
        for layer in encoder.layers:
            x = layer(x, None)
        return encoder.layer_norm(x)

    def _prefill(self, ready: list[tuple[int, TranscriptionRequest]]) -> list[Output]:
        import numpy as np

        outputs = []
        for seq_id, request in ready:
            samples = padded_samples(len(request.audio))
            audio = np.pad(request.audio[:samples], (0, max(0, samples - len(request.audio)))).astype(np.float32)
            started = time.perf_counter()
            enc = self.encode([audio])[0]
            request.encoder_seconds = time.perf_counter() - started
            outputs += self._start_row(seq_id, request, enc, len(request.audio))
        return outputs

    def _cross_kv(self, enc: torch.Tensor) -> torch.Tensor:
        block = self._block
        assert block is not None
        layers, _, _, heads, _, dim = block.shape
        kv = [torch.stack([a.k_proj(enc), a.v_proj(enc)]) for a in (layer.encoder_attn for layer in self.model.model.decoder.layers)]
        return torch.stack(kv).view(layers, 2, -1, heads, dim).transpose(2, 3)

    def _start_row(self, seq_id: int, request: TranscriptionRequest, enc: torch.Tensor, samples: int) -> list[Output]:
        """Add a window to the block, run its prompt (detecting the language if asked) and its draft, and pick its first tokens."""
        vocab, block = self.vocab, self._block
        assert vocab is not None and block is not None
        prompt = vocab.prompt(request)
        max_new = self.max_new_tokens(len(prompt))
        row = block.add(self._cross_kv(enc), len(prompt) + max_new)
        max_timestamp = vocab.timestamp_begin + math.ceil(samples / SAMPLE_RATE / 0.02)
        self._rows.append(_Row(seq_id, request, len(prompt), max_timestamp, list(request.prefix)))  # the rules see the prefix as generated
        draft = request.draft[: max_new - 1]
        start = 0
        if request.language is None and vocab.multilingual:
            start = prompt.index(vocab.sot) + 1
            logits = self._forward([row], torch.tensor([prompt[:start]], device=self.device))
            ids = list(vocab.languages.values())
            best = ids[int(logits[0, -1, ids].argmax())]
            request.detected_language = vocab.language_of[best]
            prompt[start] = best
        logits = self._forward([row], torch.tensor([prompt[start:] + draft], device=self.device), keep=len(draft) + 1)
        return self._verify(row, draft, logits[0])

    def _verify(self, row: int, draft: list[int], logits: torch.Tensor) -> list[Output]:
        """Pick tokens from the logits after the prompt and after each draft token, keeping the draft while it is what greedy decoding picks.

        The first pick that differs from the draft (or ends the window) is the row's next token; the keys and
        values of the draft tokens after it are dropped. Every token is still the greedy pick under the rules, so
        the transcript is the one decoding without a draft gives (the draft's logits come from one pass, as the
        prompt's do, and may differ from single steps' by float rounding only).
        """
        block = self._block
        assert block is not None
        block.lengths[row] -= len(draft)
        outputs: list[Output] = []
        for i, scores in enumerate(logits):
            (out,) = self._pick([row], scores[None])
            outputs.append(out)
            if out.done is not None or i == len(draft) or out.token != draft[i]:
                return outputs
            block.lengths[row] += 1
            self._rows[row].request.draft_kept += 1
        return outputs

    def _decode(self) -> list[Output]:
        rows = list(range(len(self._rows)))
        last = torch.tensor([[self._rows[r].generated[-1]] for r in rows], device=self.device)
        return self._pick(rows, self._forward(rows, last)[:, -1])

    def _forward(self, rows: list[int], tokens: torch.Tensor, keep: int = 1) -> torch.Tensor:
        """Feed `tokens` `[len(rows), T]` to the given block rows (contiguous, or one row); return the logits of the last `keep` positions `[len(rows), keep, vocab]`."""
        block = self._block
        assert block is not None and block.self_kv is not None and block.cross_kv is not None
        decoder = self.model.model.decoder
        n, t = tokens.shape
        starts = torch.tensor([block.lengths[r] for r in rows], device=self.device)
        block.ensure_columns(max(block.lengths[r] for r in rows) + t)
        sel = slice(rows[0], rows[0] + 1) if n == 1 else slice(0, n)
        self_kv, cross_kv = block.self_kv[:, :, sel], block.cross_kv[:, :, sel]
        width = int(starts.max()) + t
        enc_width = max(block.enc_lengths[r] for r in rows)
        positions = starts[:, None] + torch.arange(t, device=self.device)
        columns = torch.arange(width, device=self.device)
        self_mask = (columns[None, None, :] <= positions[:, :, None])[:, None]
        enc_lengths = torch.tensor([block.enc_lengths[r] for r in rows], device=self.device)
        cross_mask = (torch.arange(enc_width, device=self.device)[None, :] < enc_lengths[:, None])[:, None, None]
        x = decoder.embed_tokens(tokens) + decoder.embed_positions.weight[positions]
        heads, dim = block.shape[3], block.shape[5]
        batch_index = torch.arange(n, device=self.device)[:, None]

        def split(h: torch.Tensor) -> torch.Tensor:
            return h.view(n, -1, heads, dim).transpose(1, 2)

        for i, layer in enumerate(decoder.layers):
            h = layer.self_attn_layer_norm(x)
            attn = layer.self_attn
            k, v = split(attn.k_proj(h)), split(attn.v_proj(h))
            for j, new in enumerate((k, v)):
                self_kv[i, j][batch_index, :, positions] = new.transpose(1, 2)
            out = F.scaled_dot_product_attention(split(attn.q_proj(h)), self_kv[i, 0, :, :, :width], self_kv[i, 1, :, :, :width], attn_mask=self_mask)
            x = x + attn.out_proj(out.transpose(1, 2).reshape(n, t, -1))
            h = layer.encoder_attn_layer_norm(x)
            attn = layer.encoder_attn
            q = split(attn.q_proj(h))
            out = F.scaled_dot_product_attention(q, cross_kv[i, 0, :, :, :enc_width], cross_kv[i, 1, :, :, :enc_width], attn_mask=cross_mask)
            x = x + attn.out_proj(out.transpose(1, 2).reshape(n, t, -1))
            h = layer.final_layer_norm(x)
            x = x + layer.fc2(layer.activation_fn(layer.fc1(h)))
        for r in rows:
            block.lengths[r] += t
        return self.model.proj_out(decoder.layer_norm(x[:, -keep:])).float()

    def _pick(self, rows: list[int], logits: torch.Tensor) -> list[Output]:
        """Greedy tokens under Whisper's rules; a row that ends (end of text) leaves the block."""
        vocab = self.vocab
        assert vocab is not None and self._suppress is not None and self._block is not None
        logits = logits.masked_fill(self._suppress, -math.inf)
        ts = vocab.timestamp_begin
        outputs, ended = [], []
        for i, r in enumerate(rows):
            row, scores = self._rows[r], logits[i]
            seq = row.generated
            if not seq:
                scores[self._begin_suppress] = -math.inf
            if row.request.timestamps:
                scores[vocab.no_timestamps] = -math.inf
                scores[row.max_timestamp + 1 :] = -math.inf
                last_ts = len(seq) >= 1 and seq[-1] >= ts
                penultimate_ts = len(seq) < 2 or seq[-2] >= ts
                if last_ts:
                    if penultimate_ts:
                        scores[ts:] = -math.inf
                    else:
                        scores[: vocab.eot] = -math.inf
                stamps = [tok for tok in seq if tok >= ts]
                if stamps:
                    scores[ts : stamps[-1] if last_ts and not penultimate_ts else stamps[-1] + 1] = -math.inf
                if not seq:
                    scores[:ts] = -math.inf
                    scores[ts + 51 :] = -math.inf  # at most 1 s of leading silence (max_initial_timestamp 50)
                logprobs = torch.log_softmax(scores, dim=-1)
                if logprobs[ts:].logsumexp(-1) > logprobs[:ts].max():
                    scores[:ts] = -math.inf
            token = int(scores.argmax())
            if token >= ts and (not seq or seq[-1] >= ts) and token >= row.max_timestamp - END_SLACK:
                token = vocab.eot  # a segment would start where the audio ends: what Whisper says there is made up
            if token == vocab.eot:
                outputs.append(Output(row.seq_id, done="stop"))
                ended.append(row.seq_id)
                continue
            seq.append(token)
            if repeated_tail(row.decoded()):  # a loop: stop here; the reader drops the repeat (asr.repeated_tail)
                outputs.append(Output(row.seq_id, token=token, done="stop"))
                ended.append(row.seq_id)
                continue
            if self._block.lengths[r] + 1 >= self.max_positions:  # no position left for the next step (the scheduler's limit is lower)
                outputs.append(Output(row.seq_id, token=token, done="length"))
                ended.append(row.seq_id)
                continue
            outputs.append(Output(row.seq_id, token=token))
        for seq_id in ended:
            self._drop(seq_id)
        return outputs
