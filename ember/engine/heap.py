"""The garbage collector and a long-running server: what startup built is frozen out of its scans."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Move every object alive now (modules, the model's wrappers, the tokenizer: ~180k with the embedded model)
    out of the collector's reach. A full collection scans them all, ~70 ms on the CI machine: a stall that a busy
    server's allocations trigger now and then, and that one decode step cannot hide. They live as long as the
    process anyway."""
    gc.collect()
    gc.freeze()
