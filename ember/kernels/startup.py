"""Triton's one-time process costs, paid in a background thread while the weights load.

The first Triton kernel a process runs imports Triton (~0.3 s) and hashes Triton's own sources and its ~100 MB
compiler library into the key of its kernel cache (~0.4 s on an H200 machine), whether or not the kernels are in
that cache. The weight reads leave the GIL free most of the time and hashing releases it, so doing both then
takes ~0.5 s off a cold start's KV-cache profiling pass, where the first kernel runs.
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger(__name__)


def _prepare() -> None:
    try:
        import triton.runtime.cache

        import ember.kernels.fused  # noqa: F401  (Triton itself, and the kernels the profiling pass launches first)

        key = getattr(triton.runtime.cache, "triton_key", None)  # internal, cached per process; absent: skip
        if callable(key):
            key()
    except Exception:  # an optimisation only: the first kernel launch does the same work if this fails
        logger.debug("preparing Triton in the background failed", exc_info=True)


def prepare_triton_in_background() -> threading.Thread:
    thread = threading.Thread(target=_prepare, name="ember-triton-startup", daemon=True)
    thread.start()
    return thread
