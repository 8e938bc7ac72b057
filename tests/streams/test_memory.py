"""The worker's memory settling (streams.runtime.settle_memory): long-lived objects leave the
cyclic collector's view, objects made afterwards are still collected."""

from __future__ import annotations

import asyncio
import gc
import weakref

from streams.runtime import settle_memory


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_settling_freezes_what_lives_now_and_later_garbage_is_still_collected():
    long_lived = [_Node() for _ in range(1000)]
    try:
        asyncio.run(settle_memory())
        frozen = gc.get_freeze_count()
        assert frozen >= 1000, frozen
        # A full collection now walks only what was made since: far fewer objects.
        assert len(gc.get_objects(generation=2)) < frozen
        # A reference cycle made after settling is still found and freed.
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
        del long_lived
