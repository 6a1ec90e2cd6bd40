"""Weight formats for the chat model on a CPU (`STREAMPLEX_CHAT_CPU_WEIGHTS`).

A decode step of a small model reads every weight once, so its time is mostly bytes of weights over
memory bandwidth, plus eager per-op overhead (docs/engine.md, "CPU weights"). The formats:

- `float32`: the converted weights as they are (538 MB a step for SmolLM2-135M).
- `bfloat16`: the whole model in bfloat16 (oneDNN kernels on AVX-512 BF16), activations and KV cache too.
- `int8`: every linear layer (the tied output projection included) keeps int8 weights with one scale per
  output channel (symmetric, round to nearest, from the float32 weights) and runs
  `torch.ops.aten._weight_int8pack_mm`, the weight-only scheme gpt-fast uses on CPU; the rest of the
  model, activations and KV cache are bfloat16. Each output row is a dot product of its own activations
  with the weights, so no row depends on the others (unlike dynamic quantization, whose activation scale
  is taken over the whole batch). The input embedding stays a row lookup.
- `float16`: every linear layer's weights rounded to float16 (the tied output projection gets its own
  copy). A call of at most `Float16Linear.FBGEMM_ROWS` rows runs fbgemm's float16-weight kernel (reads
  half the bytes; what the Whisper decoder uses, `STREAMPLEX_ASR_CPU_QUANTIZE`); a larger one runs MKL's
  float32 product over the same rounded weights widened to float32 (exactly), which is faster there.
  Activations and KV cache stay float32, and both kernels compute the same products of the same
  numbers in float32, so a row's result depends on the batch only through summation order, as with
  float32 weights. Memory: both copies (about 810 MB for SmolLM2-135M, against 538 MB).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

Weights = Literal["float32", "bfloat16", "int8", "float16"]


def activation_dtype(weights: str) -> torch.dtype:
    """The dtype of activations and KV cache under a weight format."""
    return torch.bfloat16 if weights in ("bfloat16", "int8") else torch.float32


class Int8Linear(nn.Module):
    """A linear layer with per-output-channel int8 weights; activations in `dtype`."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(dtype).contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.weight, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class Float16Linear(nn.Module):
    """A linear layer with float16-rounded weights and float32 activations: fbgemm's float16 kernel for few rows, MKL above."""

    FBGEMM_ROWS = 16  # measured: fbgemm's kernel is 2-3x faster than MKL's float32 up to 4 rows, even at 16, slower at 64

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float().half().float().contiguous()
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= self.FBGEMM_ROWS:
            out = torch.ops.quantized.linear_dynamic_fp16(rows.contiguous(), self.packed)
        else:
            out = nn.functional.linear(rows, self.weight, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


def replace_linear(model: nn.Module, make: Any) -> nn.Module:
    """Replace every `nn.Linear` of `model` (in place) by `make(linear)`; a tied output projection gets its own copy."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(child))
    return model


def quantize_int8(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every `nn.Linear` of `model` (in place) by an `Int8Linear`."""
    return replace_linear(model, lambda linear: Int8Linear(linear, dtype))


def apply(model: Any, weights: str) -> Any:
    """`model` (float32, on the CPU) with its weights in the format `weights`."""
    if weights == "int8":
        return quantize_int8(model).to(torch.bfloat16)
    if weights == "bfloat16":
        return model.to(torch.bfloat16)
    if weights == "float16":
        return replace_linear(model, Float16Linear)
    return model
