"""The driver's liveness watch (on when all-reduces run on symmetric memory, whose kernels wait without a
timeout): a dead worker ends the process only if the GPU is still waiting on it after the model timeout and the
group has not been torn down."""

from __future__ import annotations

import os
import threading
import types

import pytest

from ember.engine.workers import WorkerGroup


class _Exited(Exception):
    pass


def _proc(alive: bool) -> types.SimpleNamespace:
    return types.SimpleNamespace(is_alive=lambda: alive, exitcode=None if alive else -9)


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_exit(code: int) -> None:
        raise _Exited(code)

    monkeypatch.setattr(os, "_exit", fake_exit)


def _watch(group: types.SimpleNamespace, procs: list, stuck: bool, timeout_s: float = 0.2) -> None:
    WorkerGroup.watch_liveness(group, procs, timeout_s=timeout_s, poll_s=0.01, stuck=lambda: stuck)


def test_a_dead_worker_and_a_stuck_gpu_exit_the_process(exits: None) -> None:
    with pytest.raises(_Exited) as exited:
        _watch(types.SimpleNamespace(closed=False), [_proc(True), _proc(False)], stuck=True)
    assert exited.value.args == (1,)


def test_a_dead_worker_with_the_gpu_idle_leaves_the_process_alone(exits: None) -> None:
    # Died between steps: the next step fails at once on its send; nothing is waiting on the GPU.
    _watch(types.SimpleNamespace(closed=False), [_proc(False)], stuck=False)


def test_a_teardown_within_the_timeout_ends_the_watch_quietly(exits: None) -> None:
    group = types.SimpleNamespace(closed=False)
    threading.Timer(0.1, lambda: setattr(group, "closed", True)).start()
    _watch(group, [_proc(False)], stuck=True, timeout_s=30)


def test_live_workers_keep_the_watch_going_until_the_teardown(exits: None) -> None:
    group = types.SimpleNamespace(closed=False)
    threading.Timer(0.2, lambda: setattr(group, "closed", True)).start()
    _watch(group, [_proc(True)], stuck=True, timeout_s=0.01)
