"""KV cache storage for batched decoding.

`KVBlock` holds the keys and values of a set of rows (sequences) in one tensor shaped
`[2 * layers, rows, kv_heads, columns, head_dim]`. Rows are right-aligned: every row ends at column
`width`, row r's tokens fill columns [start[r], width), and the columns before start[r] are padding that
the attention mask hides. A decode step writes one new column for every row at once; a row joins by
copying its prefilled cache in, and leaves by moving the last row into its place. Positions are
per-row (`width - start[r]`), so padding never shifts a sequence's rotary positions.
"""

from __future__ import annotations

import torch

COLUMN_GROWTH = 64


class KVBlock:
    """Right-aligned per-row KV storage for `layers` attention layers."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.layers = layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.buf: torch.Tensor | None = None
        self.starts: list[int] = []
        self.width = 0
        self.pending = 0

    @property
    def rows(self) -> int:
        return len(self.starts)

    def lengths(self) -> list[int]:
        """Tokens cached per row."""
        return [self.width - s for s in self.starts]

    def nbytes(self) -> int:
        return 0 if self.buf is None else self.buf.numel() * self.buf.element_size()

    def reserve(self, rows: int, columns: int) -> None:
        """Make room for `rows` rows and `columns` columns, keeping the content."""
        have_rows, have_cols = (0, 0) if self.buf is None else (self.buf.shape[1], self.buf.shape[3])
        if rows <= have_rows and columns <= have_cols:
            return
        self._realloc(max(rows, have_rows), max(columns, have_cols), shift=0)

    def _realloc(self, rows: int, columns: int, shift: int) -> None:
        """Move the content into a new buffer, `shift` columns to the right (negative: drop leading columns)."""
        new = torch.zeros((2 * self.layers, rows, self.kv_heads, columns, self.head_dim), dtype=self.dtype, device=self.device)
        if self.buf is not None and self.rows:
            keep = min(self.width, self.width + shift)
            new[:, : self.rows, :, self.width + shift - keep : self.width + shift] = self.buf[:, : self.rows, :, self.width - keep : self.width]
        self.buf = new
        self.starts = [s + shift for s in self.starts]
        self.width += shift

    def open_single(self, columns: int) -> None:
        """Make this an empty one-row block with room for `columns` tokens (a prompt being prefilled)."""
        self.reserve(1, columns)
        self.starts = [self.width]

    def seed(self, kv: torch.Tensor) -> None:
        """Fill the next columns of a one-row block with cached keys and values shaped [2 * layers, kv_heads, n, head_dim]."""
        n = kv.shape[2]
        self.prepare(n)
        assert self.buf is not None
        self.buf[:, 0, :, self.width : self.width + n] = kv
        self.commit()

    def columns(self, row: int, begin: int, end: int) -> torch.Tensor:
        """A copy of columns [begin, end) of one row: [2 * layers, kv_heads, end - begin, head_dim]."""
        assert self.buf is not None
        return self.buf[:, row, :, begin:end].clone()

    def add_row(self, src: KVBlock, begin: int, end: int) -> int:
        """Append columns [begin, end) of row 0 of `src` as a new right-aligned row; return its index."""
        length = end - begin
        rows_cap = 0 if self.buf is None else self.buf.shape[1]
        if self.rows + 1 > rows_cap:
            rows_cap = max(self.rows + 1, 2 * rows_cap)
        if length > self.width:
            self._realloc(rows_cap, length + COLUMN_GROWTH, shift=length - self.width)
        else:
            self.reserve(rows_cap, self.width)
        assert self.buf is not None and src.buf is not None
        self.buf[:, self.rows, :, self.width - length : self.width] = src.buf[:, 0, :, begin:end]
        self.starts.append(self.width - length)
        return self.rows - 1

    def remove_row(self, row: int) -> None:
        """Drop a row by moving the last one into its place; free everything when no row is left."""
        assert self.buf is not None
        last = self.rows - 1
        if row != last:
            self.buf[:, row, :, : self.width] = self.buf[:, last, :, : self.width]
            self.starts[row] = self.starts[last]
        self.starts.pop()
        if not self.starts:
            self.buf, self.width = None, 0
            return
        lead = min(self.starts)
        if lead >= max(COLUMN_GROWTH, self.width // 4):
            self._realloc(self.buf.shape[1], self.buf.shape[3] - lead, shift=-lead)

    def attention_mask(self, new: int) -> torch.Tensor:
        """Boolean mask [rows, 1, new, width + new] for `new` incoming tokens per row (causal among them)."""
        total = self.width + new
        cols = torch.arange(total, device=self.device)
        starts = torch.tensor(self.starts, device=self.device)
        valid = cols[None, :] >= starts[:, None]
        causal = cols[None, :] <= (self.width + torch.arange(new, device=self.device))[:, None]
        return (valid[:, None, :] & causal[None, :, :])[:, None]

    def prepare(self, new: int) -> None:
        """Make room for `new` columns after `width`; `write` fills them and `commit` adopts them."""
        if self.buf is None or self.width + new > self.buf.shape[3]:
            self.reserve(self.rows, self.width + new + COLUMN_GROWTH)
        self.pending = new

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new keys and values [rows, kv_heads, pending, head_dim]; return views of everything up to them."""
        assert self.buf is not None
        end = self.width + self.pending
        k, v = self.buf[2 * layer, : self.rows], self.buf[2 * layer + 1, : self.rows]
        k[:, :, self.width : end] = keys
        v[:, :, self.width : end] = values
        return k[:, :, :end], v[:, :, :end]

    def commit(self) -> None:
        """Make the columns written since `prepare` part of every row."""
        self.width += self.pending
        self.pending = 0
