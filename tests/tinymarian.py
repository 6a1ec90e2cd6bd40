"""A tiny, randomly initialised Marian translation model, built here for tests.

No neural MT weights ship in any registry this project can reach, so the neural translation path is tested on
this model: its sentencepiece vocabulary is trained on a few sentences and its weights are random (seeded), so its
"translations" are meaningless token sequences. The tests check the machinery (batched greedy decoding equals
one-at-a-time decoding, streaming, limits), not translation quality.
"""

from __future__ import annotations

import io
import json
from functools import cache
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import MarianConfig, MarianMTModel, MarianTokenizer

CORPUS = [
    "The cat is black.", "I like apples and oranges.", "Where is the train station?", "The weather is nice today.",
    "El gato es negro.", "Me gustan las manzanas y las naranjas.", "¿Dónde está la estación de tren?", "Hace buen tiempo hoy.",
    "My name is John and I live in London.", "Mi nombre es John y vivo en Londres.",
]  # fmt: skip


@cache
def tiny_marian(folder: Path) -> Path:
    """Write the model and its tokenizer into `folder` (once per folder) and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=model_bytes, vocab_size=64, model_type="unigram", minloglevel=2)
    spm_file = folder / "source.spm"
    spm_file.write_bytes(model_bytes.getvalue())
    (folder / "target.spm").write_bytes(model_bytes.getvalue())
    pieces = spm.SentencePieceProcessor(model_proto=model_bytes.getvalue())
    vocab = {"</s>": 0, "<unk>": 1}
    for i in range(pieces.get_piece_size()):
        vocab.setdefault(pieces.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = MarianTokenizer(
        vocab=str(folder / "vocab.json"), source_spm=str(spm_file), target_spm=str(folder / "target.spm"), source_lang="en", target_lang="es"
    )
    tokenizer.save_pretrained(folder)
    config = MarianConfig(
        vocab_size=len(vocab), decoder_vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=vocab["<pad>"], eos_token_id=0, decoder_start_token_id=vocab["<pad>"], forced_eos_token_id=0, init_std=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    MarianMTModel(config).eval().save_pretrained(folder)
    return folder
