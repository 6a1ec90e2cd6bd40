"""Weight formats for the chat model on a CPU (`STREAMPLEX_CHAT_CPU_WEIGHTS`).

A decode step of a small model reads every weight once, so at a few rows its time is mostly bytes of
weights over memory bandwidth, plus eager per-op overhead (docs/engine.md, "CPU weights"). The formats:

- `float32`: the converted weights as they are (538 MB a step for SmolLM2-135M).
- `float16`: every linear layer's weights rounded to float16 (the tied output projection gets its own
  copy; the input embedding stays a float32 row lookup). A call of at most `Float16Linear.FBGEMM_ROWS`
  rows runs fbgemm's float16-weight kernel, which reads half the bytes (the Whisper decoder's kernel,
  `STREAMPLEX_ASR_CPU_QUANTIZE`); a larger one runs MKL's float32 product over the same rounded weights
  widened to float32 (exactly), which is faster there. Activations and KV cache stay float32, and both
  kernels multiply the same numbers in float32, so a row's result depends on the batch only through
  summation order, as with float32 weights. Memory: both copies, about 920 MB against 538 MB.

bfloat16 (`STREAMPLEX_DTYPE=bfloat16`), weight-only int8 with bfloat16 activations and fbgemm's dynamic
int8 were measured too (bench/chat_step.py) and are not offered here: the first two round activations
to bfloat16, and a sequence's greedy tokens then changed with what else was in the batch (bfloat16,
measured by the batching test); dynamic int8 scales activations over the whole batch.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

Weights = Literal["float32", "float16"]


class Float16Linear(nn.Module):
    """A linear layer with float16-rounded weights and float32 activations: fbgemm's float16 kernel for few rows, MKL above."""

    FBGEMM_ROWS = 16  # measured (bench/chat_step.py): fbgemm's kernel wins up to 16 rows, MKL's float32 at 64
    weight: torch.Tensor
    bias: torch.Tensor | None

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


def apply(model: Any, weights: str) -> Any:
    """`model` (float32, on the CPU) with its weights in the format `weights`."""
    return replace_linear(model, Float16Linear) if weights == "float16" else model
