"""The runtime's process-wide settings."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from streamplex.server.config import Settings
from streamplex.server.runtime import settle_collector


@pytest.fixture
def collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("collector")
def test_start_up_objects_are_frozen_and_full_collections_come_gc_full_every_middle_ones() -> None:
    made_at_start = [[] for _ in range(1000)]
    young, middle, _ = gc.get_threshold()
    settle_collector(Settings(gc_full_every=37))
    assert gc.get_threshold() == (young, middle, 37)
    assert gc.get_freeze_count() >= len(made_at_start)
    assert not any(o is made_at_start for o in gc.get_objects()), "frozen objects are in no generation the collector walks"
