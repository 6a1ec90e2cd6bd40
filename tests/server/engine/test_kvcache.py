"""KVBlock bookkeeping on tiny tensors: rows join right-aligned, leave without disturbing the others, and padding is trimmed."""

from __future__ import annotations

import torch

from streamplex.server.engine.kvcache import COLUMN_GROWTH, KVBlock


def block() -> KVBlock:
    return KVBlock(layers=1, kv_heads=1, head_dim=1, dtype=torch.float32, device=torch.device("cpu"))


def prompt(values: list[float]) -> KVBlock:
    """A one-row block holding `values` as keys (and their negatives as values)."""
    single = block()
    single.open_single(len(values))
    single.prepare(len(values))
    keys = torch.tensor(values).view(1, 1, -1, 1)
    single.write(0, keys, -keys)
    single.commit()
    return single


def content(b: KVBlock) -> list[list[float]]:
    """Each row's keys, padding excluded, checking the values mirror them."""
    assert b.buf is not None
    rows = []
    for r, start in enumerate(b.starts):
        keys, values = b.buf[0, r, 0, start : b.width, 0], b.buf[1, r, 0, start : b.width, 0]
        assert torch.equal(values, -keys)
        rows.append(keys.tolist())
    return rows


def test_join_decode_leave_and_trim() -> None:
    b = block()
    b.add_row(prompt([1.0, 2.0]), 0, 2)
    b.add_row(prompt([5.0, 6.0, 7.0, 8.0]), 1, 4)
    assert b.width == 3 and b.starts == [1, 0] and b.lengths() == [2, 3]
    mask = b.attention_mask(1)[:, 0, 0]
    assert mask.tolist() == [[False, True, True, True], [True, True, True, True]]
    b.prepare(1)
    b.write(0, torch.tensor([3.0, 9.0]).view(2, 1, 1, 1), -torch.tensor([3.0, 9.0]).view(2, 1, 1, 1))
    b.commit()
    assert content(b) == [[1.0, 2.0, 3.0], [6.0, 7.0, 8.0, 9.0]]
    long = [float(i) for i in range(100, 100 + 2 * COLUMN_GROWTH)]
    b.add_row(prompt(long), 0, len(long))
    assert b.lengths() == [3, 4, len(long)] and content(b)[:2] == [[1.0, 2.0, 3.0], [6.0, 7.0, 8.0, 9.0]]
    b.remove_row(2)
    assert b.width == 4, "leading padding of a quarter or more is trimmed once the long row leaves"
    assert content(b) == [[1.0, 2.0, 3.0], [6.0, 7.0, 8.0, 9.0]]
    b.remove_row(0)
    assert content(b) == [[6.0, 7.0, 8.0, 9.0]]
    b.remove_row(0)
    assert b.buf is None and b.nbytes() == 0
