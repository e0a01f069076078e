"""The startup heap is frozen out of the garbage collector's scans (ember/engine/heap.py)."""

from __future__ import annotations

import gc

from ember.engine.heap import freeze_startup_heap


def test_frozen_objects_leave_the_collected_generations_and_new_garbage_is_still_collected() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the collector frees it

    survivors = [[i] for i in range(50_000)]
    before = gc.get_freeze_count()
    freeze_startup_heap()
    try:
        assert gc.get_freeze_count() >= before + len(survivors)
        scanned = {id(o) for o in gc.get_objects(generation=2)}
        assert not any(id(s) in scanned for s in survivors)
        garbage = Node()
        del garbage
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
