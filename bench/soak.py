"""Soak test on loopback: start `ember serve`, keep it busy for N minutes with a bounded request mix, report.

    python bench/soak.py --minutes 10 --concurrency 4 [--out soak.json] [-- extra serve flags]

The mix: non-streamed and streamed chats, completions, and one request in ten that hangs up mid-stream (not a
failure: it exercises the abort path for leaks). It stops by itself after --minutes or --max-requests, then
checks that the engine is idle with its KV cache empty, and prints one JSON summary: requests, failures,
p50/p99 latency, the server's resident memory at the start (after warm-up) and at the end. Only loopback: the
server is started here, on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

CHATS = ["Say hello.", "What is the capital of France?", "Write a haiku about rain.", "Count to ten.",
         "Explain what a CPU does in one sentence."]
PROMPTS = ["Once upon a time", "The quick brown fox", "def fibonacci(n):", "1, 2, 3, 4,"]


def rss_bytes(pid: int) -> int:
    """Resident set size from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _drain(stream: IO[str]) -> None:
    for _ in stream:
        pass


def start_server(extra: list[str]) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "ember", "serve", "--host", "127.0.0.1", "--port", "0",
           "--disable-uvicorn-access-log", "--disable-log-requests", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 600
    for line in proc.stderr:
        m = re.search(r"ember ready in .* at (http://127\.0\.0\.1:\d+)/v1", line)
        if m:
            # Keep reading stderr, or the server would block on a full pipe when it logs.
            threading.Thread(target=_drain, args=(proc.stderr,), daemon=True).start()
            return proc, m.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("the server did not become ready")


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    hangups: int = 0
    tokens: int = 0
    rss_samples_mib: list[float] = field(default_factory=list)


async def one_request(client: httpx.AsyncClient, i: int, res: Results) -> None:
    kind = i % 10
    start = time.perf_counter()
    try:
        if kind == 9:  # hang up after the first event
            body = {"messages": [{"role": "user", "content": CHATS[i % len(CHATS)]}], "max_tokens": 64,
                    "stream": True, "ignore_eos": True}
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break
            res.hangups += 1
            return
        if kind < 4:
            body = {"messages": [{"role": "user", "content": CHATS[i % len(CHATS)]}],
                    "max_tokens": 16 + 8 * (i % 4), "temperature": 0.7}
            r = await client.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            res.tokens += r.json()["usage"]["completion_tokens"]
        elif kind < 7:
            body = {"messages": [{"role": "user", "content": CHATS[i % len(CHATS)]}], "max_tokens": 32,
                    "stream": True, "stream_options": {"include_usage": True}}
            done = False
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            raise RuntimeError(f"error event: {chunk['error']}")
                        if chunk.get("usage"):
                            res.tokens += chunk["usage"]["completion_tokens"]
            if not done:
                raise RuntimeError("stream ended without [DONE]")
        else:
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 24, "n": 1 + i % 2}
            r = await client.post("/v1/completions", json=body)
            r.raise_for_status()
            res.tokens += r.json()["usage"]["completion_tokens"]
        res.latencies.append(time.perf_counter() - start)
        res.ok += 1
    except Exception as e:  # recorded, reported, and the soak goes on
        res.failures.append(f"{type(e).__name__}: {e}"[:300])


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def soak(url: str, minutes: float, concurrency: int, max_requests: int, pid: int | None = None,
               rss_every_s: float = 60.0) -> Results:
    """Run the mix; with `pid`, sample the server's RSS every `rss_every_s` (a leak grows, a cache levels off)."""
    res = Results()
    deadline = time.monotonic() + minutes * 60
    counter = iter(range(max_requests))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            if time.monotonic() >= deadline:
                return
            await one_request(client, i, res)

    async def sample_rss() -> None:
        while pid is not None and time.monotonic() < deadline:
            await asyncio.sleep(min(rss_every_s, max(deadline - time.monotonic(), 0.01)))
            res.rss_samples_mib.append(round(rss_bytes(pid) / 2**20, 1))

    sampler = asyncio.ensure_future(sample_rss())
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    sampler.cancel()
    return res


def engine_state(url: str) -> dict[str, float]:
    """The engine gauges from /metrics, once nothing should be running any more."""
    want = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
    state: dict[str, float] = {}
    for _ in range(100):
        for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
            name = line.split("{", 1)[0]
            if name in want:
                state[name] = float(line.rsplit(" ", 1)[1])
        if not any(state.values()):
            break
        time.sleep(0.1)
    return state


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-requests", type=int, default=200_000, help="stop after this many requests anyway")
    p.add_argument("--rss-every", type=float, default=60.0, help="seconds between memory samples")
    p.add_argument("--out", default=None, help="also write the JSON summary here")
    p.add_argument("serve_args", nargs="*", help="extra `ember serve` flags (after --)")
    args = p.parse_args()
    if not 0 < args.minutes <= 120 or not 1 <= args.concurrency <= 256:
        p.error("--minutes must be in (0, 120] and --concurrency in [1, 256]")

    proc, url = start_server(args.serve_args)
    try:
        asyncio.run(soak(url, 0.1, 2, 8))  # a few requests first, so start memory is after warm-up
        rss_start = rss_bytes(proc.pid)
        t0 = time.monotonic()
        res = asyncio.run(soak(url, args.minutes, args.concurrency, args.max_requests, proc.pid,
                               args.rss_every))
        elapsed = time.monotonic() - t0
        state = engine_state(url)
        rss_end = rss_bytes(proc.pid)
        healthy = httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        proc.terminate()
        code = proc.wait(timeout=120)
    summary: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "seconds": round(elapsed, 1),
        "concurrency": args.concurrency,
        "requests": res.ok + len(res.failures) + res.hangups,
        "completed": res.ok,
        "hangups": res.hangups,
        "failures": len(res.failures),
        "failure_samples": res.failures[:5],
        "completion_tokens": res.tokens,
        "latency_p50_s": round(percentile(res.latencies, 50), 3),
        "latency_p99_s": round(percentile(res.latencies, 99), 3),
        "rss_start_mib": round(rss_start / 2**20, 1),
        "rss_end_mib": round(rss_end / 2**20, 1),
        "rss_samples_mib": res.rss_samples_mib,
        "engine_after": state,
        "healthy_after": healthy,
        "exit_code_after_sigterm": code,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    clean = not res.failures and healthy and code == 0 and not any(state.values())
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
