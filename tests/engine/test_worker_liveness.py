"""The driver's liveness watch (on when all-reduces run on symmetric memory, whose kernels wait without a
timeout): a dead worker ends the process unless the engine stops the group in time."""

from __future__ import annotations

import os
import threading
import types

import pytest

from ember.engine.workers import WorkerGroup


class _Exited(Exception):
    pass


def _group(alive: bool) -> types.SimpleNamespace:
    proc = types.SimpleNamespace(is_alive=lambda: alive, exitcode=None if alive else -9)
    return types.SimpleNamespace(stopped=False, procs=[proc])


def test_a_dead_worker_and_no_stop_exit_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_exit(code: int) -> None:
        raise _Exited(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    with pytest.raises(_Exited) as exited:
        WorkerGroup.watch_liveness(_group(alive=False), timeout_s=0.2, poll_s=0.01)
    assert exited.value.args == (1,)


def test_a_stop_within_the_timeout_ends_the_watch_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "_exit", lambda code: pytest.fail("exited"))
    group = _group(alive=False)
    threading.Timer(0.1, lambda: setattr(group, "stopped", True)).start()
    WorkerGroup.watch_liveness(group, timeout_s=30, poll_s=0.01)


def test_live_workers_keep_the_watch_going_until_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "_exit", lambda code: pytest.fail("exited"))
    group = _group(alive=True)
    threading.Timer(0.2, lambda: setattr(group, "stopped", True)).start()
    WorkerGroup.watch_liveness(group, timeout_s=0.01, poll_s=0.01)
