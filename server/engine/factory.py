"""Building the engine from settings. Importing this does not import torch: runners are created at load time."""

from __future__ import annotations

import functools
from collections.abc import Collection

from streamplex.server.config import Settings
from streamplex.server.engine import whisper_loading
from streamplex.server.engine.batch import BatchRunner
from streamplex.server.engine.engine import Engine, Limits
from streamplex.server.engine.loading import model_name
from streamplex.server.engine.runner import Runner, RunnerSpec


def chat_specs(setting: str) -> list[str]:
    """The configured chat models (`STREAMPLEX_CHAT_MODEL`, comma-separated)."""
    return [part.strip() for part in setting.split(",") if part.strip()]


def asr_specs(setting: str) -> list[str]:
    """The configured transcription models (`STREAMPLEX_ASR_MODEL`, comma-separated)."""
    return [part.strip() for part in setting.split(",") if part.strip()]


def build_engine(settings: Settings, without: Collection[str] = ()) -> Engine:
    """An engine with one runner per configured model, except those of the families in `without` (their channels run
    on model workers, or a model worker does not serve them); `await engine.start()` begins loading them."""
    specs = [RunnerSpec("chat", model_name(spec), functools.partial(_chat_runner, spec, settings)) for spec in chat_specs(settings.chat_model)]
    specs += [
        RunnerSpec("transcription", whisper_loading.model_name(spec), functools.partial(_whisper_runner, spec, settings))
        for spec in asr_specs(settings.asr_model)
    ]
    specs += _embedding_specs(settings) + _translation_specs(settings)
    specs = [spec for spec in specs if spec.family not in without]
    limits = Limits(
        max_batch=settings.engine_max_batch,
        step_tokens=settings.engine_step_tokens,
        prefill_chunk=settings.engine_prefill_chunk,
        kv_cache_bytes=settings.engine_kv_cache_mb << 20,
        max_waiting=settings.engine_max_queue,
        batch_items=settings.engine_batch_items,
    )
    return Engine(specs, limits)


def _chat_runner(spec: str, settings: Settings) -> Runner:
    from streamplex.server.engine.causal_lm import CausalLMRunner
    from streamplex.server.engine.device import cpu_threads, resolve_device, resolve_dtype

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    return CausalLMRunner(
        spec, settings.cache_dir, device, dtype, cpu_threads(settings.engine_threads), settings.engine_prefix_cache_tokens, settings.chat_cpu_weights
    )


def _embedding_specs(settings: Settings) -> list[RunnerSpec]:
    """The sentence-embedding model (`STREAMPLEX_EMBEDDING_MODEL`), a one-shot batch runner; none when the setting is empty."""
    spec = settings.embedding_model.strip()
    if not spec:
        return []

    def create() -> BatchRunner:
        from streamplex.server.engine.device import cpu_threads, resolve_device, resolve_dtype
        from streamplex.server.engine.embedding import EmbeddingRunner

        device = resolve_device(settings.device)
        return EmbeddingRunner(spec, device, resolve_dtype(settings.dtype, device), cpu_threads(settings.engine_threads))

    return [RunnerSpec("embedding", model_name(spec), create)]


def _translation_specs(settings: Settings) -> list[RunnerSpec]:
    """The neural translation model (`STREAMPLEX_TRANSLATION_MODEL`), a token runner; none when the setting is empty."""
    spec = settings.translation_model.strip()
    if not spec:
        return []

    def create() -> Runner:
        from streamplex.server.engine.device import cpu_threads, resolve_device, resolve_dtype
        from streamplex.server.engine.seq2seq import Seq2SeqRunner

        device = resolve_device(settings.device)
        return Seq2SeqRunner(spec, device, resolve_dtype(settings.dtype, device), cpu_threads(settings.engine_threads))

    return [RunnerSpec("translation", model_name(spec), create)]


def _whisper_runner(spec: str, settings: Settings) -> Runner:
    from streamplex.server.engine.device import cpu_threads, resolve_device, resolve_dtype
    from streamplex.server.engine.whisper import WhisperRunner

    device = resolve_device(settings.device)
    return WhisperRunner(
        spec, settings.cache_dir, device, resolve_dtype(settings.dtype, device), cpu_threads(settings.engine_threads), settings.asr_cpu_quantize
    )
