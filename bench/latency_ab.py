"""`ember bench latency` under environment variants, alternating, in one call: an A/B of opt-in options.

    python bench/latency_ab.py [--variant NAME=VAR=VALUE[,VAR=VALUE...]]... [--rounds 2] [--deadline 400]
        [--json out.json] -- llama-3.1-8b-instruct --load-format dummy --tokenizer DIR --input-len 32 ...

Each run is a fresh process (the options are read when ember is imported or the graphs are captured), with the
variants in reversed order every other round, so that a drift of the card's clock or temperature over the call
falls on every variant alike. `base` (no variables set) always runs. Without `--variant` the batch-1 options
that are off by default are compared: `EMBER_GRAPH_COPIES_MAX_BATCH=8`, `EMBER_ATTN_SPLIT_KV=256,1,8`,
`EMBER_ATTN_TABLE_BEFORE_WAIT=1`, and all three. Every variable any variant sets is removed from the inherited
environment first. `--deadline` (seconds from the start) leaves the first run whole, then skips each run that
would pass it, judged by the longest run so far, and stops one that does; the JSON is written after every run.

Prints each run's TPOT and roofline percentage, then per variant the median TPOT and its change from `base`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_VARIANTS = {
    "copies": {"EMBER_GRAPH_COPIES_MAX_BATCH": "8"},
    "split256": {"EMBER_ATTN_SPLIT_KV": "256,1,8"},
    "table": {"EMBER_ATTN_TABLE_BEFORE_WAIT": "1"},
}
DEFAULT_VARIANTS["all"] = {k: v for env in DEFAULT_VARIANTS.values() for k, v in env.items()}


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """`NAME=VAR=VALUE[,VAR=VALUE...]` -> (NAME, {VAR: VALUE}); a value may hold commas only as the last one's."""
    name, sep, rest = spec.partition("=")
    if not (name and sep and rest):
        raise argparse.ArgumentTypeError(f"{spec!r}: expected NAME=VAR=VALUE[,VAR=VALUE...]")
    env: dict[str, str] = {}
    last = ""
    for part in rest.split(","):
        var, eq, value = part.partition("=")
        if eq and var.isidentifier():
            env[var] = value
            last = var
        elif last:  # a comma inside the value, as in EMBER_ATTN_SPLIT_KV=256,1,8
            env[last] += "," + part
        else:
            raise argparse.ArgumentTypeError(f"{spec!r}: {part!r} is no VAR=VALUE")
    return name, env


def schedule(names: list[str], rounds: int) -> list[str]:
    """The run order: every variant once a round, the order reversed every other round."""
    return [n for r in range(rounds) for n in (names if r % 2 == 0 else names[::-1])]


def summarize(runs: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Per variant: its runs' TPOTs, their median and the change from base's median."""
    by_name = {n: [r["tpot_ms"] for r in runs if r["variant"] == n and "tpot_ms" in r] for n in names}
    base = statistics.median(by_name["base"]) if by_name.get("base") else None
    out = []
    for n in names:
        tpots = by_name[n]
        med = statistics.median(tpots) if tpots else None
        change = 100 * (med / base - 1) if med is not None and base else None
        out.append({"variant": n, "tpot_ms": tpots, "median_tpot_ms": med, "change_from_base_pct": change})
    return out


def run_env(env: dict[str, str], compared: set[str]) -> dict[str, str]:
    """The shell's environment without any variable a variant sets, so that `base` runs without them all, plus
    this run's own."""
    return {k: v for k, v in os.environ.items() if k not in compared} | env


def _run_one(name: str, env: dict[str, str], compared: set[str], bench_args: list[str], out_json: Path,
             timeout: float | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "ember", "bench", "latency", *bench_args, "--output-json", str(out_json)]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=run_env(env, compared), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc = None
    record: dict[str, Any] = {"variant": name, "env": env, "wall_s": time.monotonic() - t0}
    if proc is None:
        return record | {"error": f"stopped at the deadline after {timeout:.0f} s"}
    if proc.returncode != 0 or not out_json.exists():
        return record | {"error": (proc.stdout[-1500:] + proc.stderr[-2500:]).strip()}
    return record | json.loads(out_json.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", type=parse_variant, action="append", default=None,
                    help="NAME=VAR=VALUE[,VAR=VALUE...]; repeatable (default: the opt-in batch-1 options)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--deadline", type=float, default=None, help="seconds from the start; later runs are skipped")
    ap.add_argument("--json", default=None)
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: the arguments of ember bench latency")
    args = ap.parse_args()
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    given = args.variant or list(DEFAULT_VARIANTS.items())
    given_names = [n for n, _ in given]
    if "base" in given_names or len(set(given_names)) != len(given_names):
        ap.error(f"variant names must be distinct and not 'base' (it always runs, with none set): {given_names}")
    variants = {"base": {}} | dict(given)
    names = list(variants)
    compared = {k for env in variants.values() for k in env}
    start, longest = time.monotonic(), 0.0
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(schedule(names, args.rounds)):
            left = None if args.deadline is None else args.deadline - (time.monotonic() - start)
            if left is not None and runs and longest > left:
                print(f"skipped {name} (run {i + 1}): the deadline", flush=True)
                continue
            rec = _run_one(name, variants[name], compared, bench_args, Path(tmp) / f"run{i}.json",
                           None if left is None or not runs else max(left, 1.0))
            longest = max(longest, rec["wall_s"])
            runs.append(rec)
            if "error" in rec:
                print(f"{name:10s} failed:\n{rec['error']}", flush=True)
            else:
                print(f"{name:10s} TPOT {rec['tpot_ms']:.3f} ms  {rec['pct_of_roofline']:.1f} % of the roofline "
                      f"({rec['bandwidth_gb_s']:.0f} GB/s)  {rec['wall_s']:.0f} s", flush=True)
            if args.json:  # after every run: a device call stopped at its limit keeps what ran
                Path(args.json).write_text(json.dumps({"runs": runs, "summary": summarize(runs, names)}, indent=1))
    summary = summarize(runs, names)
    for s in summary:
        med = "—" if s["median_tpot_ms"] is None else f"{s['median_tpot_ms']:.3f} ms"
        change = "" if s["change_from_base_pct"] is None else f"  {s['change_from_base_pct']:+.2f} %"
        print(f"{s['variant']:10s} median {med}{change}  runs {', '.join(f'{t:.3f}' for t in s['tpot_ms'])}")
    return 0 if runs and all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
