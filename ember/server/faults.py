"""Fault injection for tests of the failure path (engine death -> 500s, /health 503, non-zero exit).

Set EMBER_FAULT_STEP_FAILS_AFTER=N in the environment of `ember serve` and the engine's step raises after N
steps that had work to do. The hook is installed at start-up only when the variable is set, by replacing one
bound method, so a normal server's step loop runs exactly the code it always does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

ENV_STEP_FAILS_AFTER = "EMBER_FAULT_STEP_FAILS_AFTER"

logger = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """Raised by an engine step on purpose (see ENV_STEP_FAILS_AFTER)."""


def install_from_env(engine: Any) -> None:
    """Make `engine.step` (an LLMEngine's, in the server's process or in the engine process) fail as
    ENV_STEP_FAILS_AFTER asks; do nothing when it is unset."""
    value = os.environ.get(ENV_STEP_FAILS_AFTER)
    if not value:
        return
    limit = int(value)
    step: Callable[[], Any] = engine.step
    done = 0

    def failing_step() -> Any:
        nonlocal done
        if done >= limit:
            raise InjectedFault(f"injected by {ENV_STEP_FAILS_AFTER}={limit}")
        done += 1
        return step()

    engine.step = failing_step
    logger.warning("fault injection: the engine step will fail after %d steps", limit)
