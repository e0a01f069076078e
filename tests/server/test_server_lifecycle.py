"""`ember serve` as a supervisor sees it, each in its own process: an engine that dies fails its in-flight
requests, turns /health to 503 and exits non-zero; SIGTERM lets in-flight requests finish, then exits 0. With
`--engine-process` (the default on GPUs) the same, and the engine process never outlives the server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_log import read_until

from ember.server.faults import ENV_STEP_FAILS_AFTER

ROOT = Path(__file__).resolve().parents[2]
EMBER = [str(Path(sys.executable).parent / "ember")]
ARGS = ["serve", "--port", "0", "--max-model-len", "512", "--kv-cache-memory-bytes", "32MiB",
        "--disable-uvicorn-access-log"]
HELLO = [{"role": "user", "content": "Tell me a story."}]


def _start(extra_env: dict[str, str], *flags: str) -> tuple[subprocess.Popen[bytes], str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra_env}
    env.pop("EMBER_API_KEY", None)
    # A session of its own: a test can signal the whole process group, as a terminal's Ctrl-C or a service
    # manager does.
    proc = subprocess.Popen([*EMBER, *ARGS, *flags], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=ROOT,
                            env=env, start_new_session=True)
    m, seen = read_until(proc, r"ember ready in .* at (http://127\.0\.0\.1:\d+)/v1", timeout=300)
    if m is None:
        proc.kill()
        raise AssertionError(f"the server did not become ready:\n{seen}")
    return proc, m.group(1)


def _stop(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate(timeout=30)
    return err.decode(errors="replace")


@contextlib.contextmanager
def _server(extra_env: dict[str, str], *flags: str) -> Iterator[tuple[subprocess.Popen[bytes], str, list[str]]]:
    """A server process for the block; yields (process, URL, a list that receives its stderr once stopped).
    A failure inside the block is re-raised with the server's log attached."""
    proc, url = _start(extra_env, *flags)
    log: list[str] = []
    try:
        yield proc, url, log
    except BaseException as e:
        log.append(_stop(proc))
        raise AssertionError(f"{type(e).__name__}: {e}\n--- server log ---\n{log[-1][-6000:]}") from e
    log.append(_stop(proc))


def _events(resp: httpx.Response) -> Any:
    for line in resp.iter_lines():
        if line.startswith("data: "):
            yield line[6:]


def _children(pid: int, spawned: bool = False) -> list[int]:
    """Processes whose parent is `pid` (from /proc); `spawned`: only multiprocessing's spawned children (the
    engine process), not its resource tracker."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != pid:
                    continue
                if not spawned or b"spawn_main" in (entry / "cmdline").read_bytes():
                    kids.append(int(entry.name))
    return kids


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":  # exited, not yet reaped by a parent that is itself gone
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


PROCESS_MODES = [pytest.param("--no-engine-process", id="in-process"),
                 pytest.param("--engine-process", id="engine-process")]


@pytest.mark.parametrize("mode", PROCESS_MODES)
def test_engine_death_fails_requests_and_exits_nonzero(mode: str) -> None:
    with _server({ENV_STEP_FAILS_AFTER: "12"}, mode) as (proc, url, log):
        body = {"messages": HELLO, "max_tokens": 200, "ignore_eos": True}
        # One request waiting for a JSON answer and one stream, both in flight when the step loop dies.
        plain: dict[str, httpx.Response] = {}
        waiter = threading.Thread(target=lambda: plain.setdefault(
            "r", httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)))
        waiter.start()
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
            assert r.status_code == 200
            events = list(_events(r))
        waiter.join(120)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "engine_dead" and error["type"] == "server_error"
        assert any(json.loads(e).get("choices") for e in events[:-2])  # tokens came before the failure
        assert plain["r"].status_code == 500 and plain["r"].json()["error"]["code"] == "engine_dead"
        # Still listening for a moment: health probes see 503, new requests a 500.
        assert httpx.get(f"{url}/health", timeout=10).status_code == 503
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_dead"
        assert proc.wait(timeout=60) == 1
    assert "the engine has died" in log[0] and "InjectedFault" in log[0]


@pytest.mark.parametrize("mode", PROCESS_MODES)
def test_sigterm_drains_in_flight_requests(mode: str) -> None:
    with _server({}, "--graceful-shutdown-timeout", "120", mode) as (proc, url, log):
        kids = _children(proc.pid)
        assert len(_children(proc.pid, spawned=True)) == (mode == "--engine-process")
        body = {"messages": HELLO, "max_tokens": 64, "ignore_eos": True, "stream": True}
        after_signal = 0
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
            events = _events(r)
            first = json.loads(next(events))
            assert first["choices"][0]["delta"]["role"] == "assistant"
            # To the whole group: the engine process must leave its stopping to the server.
            os.killpg(proc.pid, signal.SIGTERM)
            # No new connections once the shutdown has begun...
            deadline = time.monotonic() + 10
            while True:
                try:
                    httpx.get(f"{url}/health", timeout=2)
                except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                    # Refused, or reset: a connection still in the accept backlog when the listening socket
                    # closes gets a reset rather than a refusal. Either way it is not served.
                    break
                assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
                time.sleep(0.05)
            # ...but the stream in flight runs to its end.
            rest = list(events)
            after_signal = len(rest)
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
        assert after_signal > 2
        assert proc.wait(timeout=60) == 0
        assert all(_gone(k, 10) for k in kids)  # the engine process, and multiprocessing's resource tracker
    assert "shutting down" in log[0]


def test_the_engine_process_ends_with_a_killed_server() -> None:
    """SIGKILL leaves the server no time to stop its engine: the engine process notices and exits by itself."""
    with _server({}, "--engine-process") as (proc, url, _):
        (engine_pid,) = _children(proc.pid, spawned=True)
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4}, timeout=60)
        assert r.status_code == 200
        proc.kill()
        assert _gone(engine_pid, 30)


@pytest.mark.parametrize("grace", ["1"])
def test_sigterm_grace_period_is_bounded(grace: str) -> None:
    """A request that would outlast the grace period is cut off; the process still exits 0, promptly."""
    with _server({}, "--graceful-shutdown-timeout", grace) as (proc, url, _):
        body = {"messages": HELLO, "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
            events = _events(r)
            next(events)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(httpx.HTTPError):  # the connection is cut mid-stream
                for _ in events:
                    pass
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - start < 30
