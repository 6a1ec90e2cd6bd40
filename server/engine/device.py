"""Where models run: device and dtype from settings, CPU threads."""

from __future__ import annotations

import os

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(setting: str) -> torch.device:
    """`auto` picks CUDA when present; asking for `cuda` without one is an error."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("STREAMPLEX_DEVICE=cuda but no CUDA device is available")
        avoid_cudnn_attention()
    return torch.device(setting)


def avoid_cudnn_attention() -> None:
    """Turn off the cuDNN backend of scaled_dot_product_attention, leaving flash, memory-efficient and math.

    cuDNN attention builds an execution graph for every new shape, and the engine's shapes change at
    every step (the KV width grows by one, the rows and prompt tokens vary); the other backends need no
    per-shape set-up. With cuDNN on (torch 2.11, an H200), SDPA took 1.6 ms a call, 60% of a 110 ms
    chat step at 64 streams: docs/benchmarks.md, "CUDA".
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """`auto` is float16 on CUDA and float32 on CPU (CPU half precision is slow and inexact)."""
    if setting == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[setting]


def cpu_threads(setting: int) -> int:
    """Intra-op threads for CPU steps: the setting, or one per usable core when it is 0."""
    return setting or len(os.sched_getaffinity(0))


def use_threads(threads: int) -> None:
    """Apply the thread count in the calling thread (torch keeps it per OS thread)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
