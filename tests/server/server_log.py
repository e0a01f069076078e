"""Reading a server process's stderr while it runs, for tests that start `ember serve` themselves."""

from __future__ import annotations

import os
import re
import select
import subprocess
import time


def read_until(proc: subprocess.Popen[bytes], pattern: str, timeout: float) -> tuple[re.Match[str] | None, str]:
    """The first match of `pattern` in `proc`'s stderr (None if the process ends or `timeout` passes first) and
    everything read so far. The pipe is read raw: a buffered `readline` after `select` can hold the awaited line
    in Python's buffer while `select` waits for more bytes that never come (a server that logs its ready line in
    the same write burst as the line before, under load)."""
    assert proc.stderr is not None
    fd, seen = proc.stderr.fileno(), ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:  # the process closed its end: it has exited
            break
        seen += chunk.decode(errors="replace")
        m = re.search(pattern, seen)
        if m:
            return m, seen
    return None, seen
