"""Attention for a mixed step: decode tokens and prompt tokens share one forward pass.

The runner feeds the model a single row holding every token of the step: one per decoding sequence,
then the prompt tokens being prefilled. The linear layers (most of the cost) run once over all of
them; attention, registered with transformers as `streamplex`, splits the row into segments, and each
segment stores its new keys and values in its own KVBlock and attends there under its own mask.
Without segments (a plain `generate` call on the same model) it is ordinary SDPA attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from streamplex.server.engine.kvcache import KVBlock

NAME = "streamplex"


@dataclass(frozen=True, slots=True)
class Packing:
    """Prompts packed back to back: where each token sits in a padded [prompts, longest] layout, for attention."""

    rows: torch.Tensor
    cols: torch.Tensor
    prompts: int
    longest: int
    mask: torch.Tensor

    @classmethod
    def of(cls, lengths: list[int], device: torch.device) -> Packing:
        sizes = torch.tensor(lengths, device=device)
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=device), sizes)
        cols = torch.cat([torch.arange(n, device=device) for n in lengths])
        index = torch.arange(max(lengths), device=device)
        causal = index[None, :] <= index[:, None]
        mask = causal[None] & (index[None, None, :] < sizes[:, None, None])
        return cls(rows, cols, len(lengths), max(lengths), mask[:, None])

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[heads, tokens, dim] -> [prompts, heads, longest, dim], zeros past each prompt's end."""
        padded = x.new_zeros(self.prompts, self.longest, x.shape[0], x.shape[2])
        padded[self.rows, self.cols] = x.transpose(0, 1)
        return padded.transpose(1, 2)


@dataclass(frozen=True, slots=True)
class Segment:
    """Tokens [begin, begin + rows * new) of the step's row: `new` tokens for each of the `rows` rows of `block`.

    A packed segment (one row holding several whole prompts) attends through `packing` instead of `mask`.
    """

    begin: int
    block: KVBlock
    rows: int
    new: int
    mask: torch.Tensor | None = None
    packing: Packing | None = None

    @property
    def end(self) -> int:
        return self.begin + self.rows * self.new


def _split(x: torch.Tensor, seg: Segment) -> torch.Tensor:
    """[1, heads, tokens, dim] -> this segment's [rows, heads, new, dim]."""
    return x[0, :, seg.begin : seg.end].unflatten(1, (seg.rows, seg.new)).transpose(0, 1)


def segmented_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    streamplex_segments: list[Segment] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if streamplex_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[3]
    groups = heads // kv_heads
    out = query.new_empty(1, query.shape[2], heads, dim)
    for seg in streamplex_segments:
        q = _split(query, seg)
        k, v = seg.block.write(cast(int, module.layer_idx), _split(key, seg), _split(value, seg))  # nn.Module attributes type as Tensor | Module
        if seg.packing is not None:  # attention within each prompt only: sum of squares, not square of the sum
            p = seg.packing
            k, v = p.pad(k[0]).repeat_interleave(groups, dim=1), p.pad(v[0]).repeat_interleave(groups, dim=1)
            o = F.scaled_dot_product_attention(p.pad(q[0]), k, v, attn_mask=p.mask, scale=scaling).transpose(1, 2)[p.rows, p.cols]
        elif seg.new == 1:  # one query per row: fold the query heads of each KV head together instead of repeating keys
            o = F.scaled_dot_product_attention(q.reshape(seg.rows, kv_heads, groups, dim), k, v, attn_mask=seg.mask, scale=scaling)
        else:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=seg.mask, scale=scaling).transpose(1, 2)
        out[0, seg.begin : seg.end] = o.reshape(seg.rows * seg.new, heads, dim)
    return out, None


AttentionInterface.register(NAME, segmented_attention)
