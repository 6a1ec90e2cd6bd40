"""Reduced-precision weights for the chat model on a CPU (`STREAMPLEX_CHAT_WEIGHTS`).

A decode step of a small model reads every weight once, so its time is mostly bytes of weights over
memory bandwidth (plus eager per-op overhead). Two formats besides float32:

- `int8`: every linear layer (the tied output projection included) keeps int8 weights with one float32
  scale per output channel (symmetric, round to nearest) and runs `torch.ops.aten._weight_int8pack_mm`
  with float32 activations, the weight-only scheme gpt-fast uses on CPU. Each output row is a dot product
  of its own activations with the dequantised weights, so a row's result does not depend on the other
  rows of the batch (unlike dynamic quantization, whose activation scale is taken over the whole batch).
  The input embedding stays float32 (it is a row lookup, not a read of the whole matrix).
- `bfloat16`: the whole model in bfloat16 (oneDNN kernels on AVX-512 BF16), activations and KV cache too.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

Weights = Literal["float32", "bfloat16", "int8"]


class Int8Linear(nn.Module):
    """A linear layer with per-output-channel int8 weights and float32 activations."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(linear.weight.dtype).contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.weight, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` of `model` (in place) by an `Int8Linear`; a tied output projection gets its own int8 copy."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return model


def apply(model: Any, weights: Weights) -> Any:
    """`model` (float32, on the CPU) with its weights in the chosen format."""
    if weights == "int8":
        return quantize_int8(model)
    if weights == "bfloat16":
        return model.to(torch.bfloat16)
    return model
