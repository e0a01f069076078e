"""Time to first token of differently shaped requests right after the engine's warm-up, and which Triton kernels
each one compiled (new entries in the kernel cache): a kernel variant the warm-up missed shows up here as a
request that took seconds instead of milliseconds.

    python3 bench/first_requests.py MODEL [--enforce-eager] [engine flags, e.g. --load-format dummy --tokenizer DIR]
"""

from __future__ import annotations

import glob
import os
import sys
import time

from ember.cli import build_parser, engine_config_from_args
from ember.engine.llm_engine import LLMEngine
from ember.sampling_params import SamplingParams

CASES = [
    ("1 token, temperature 1", [9906], SamplingParams(max_tokens=4)),
    ("1 token, temperature 1, again", [9906], SamplingParams(max_tokens=4)),
    ("8 tokens, greedy", [1] * 8, SamplingParams(temperature=0, max_tokens=4)),
    ("3 tokens, top_p 0.9", [5, 6, 7], SamplingParams(temperature=0.7, top_p=0.9, max_tokens=4)),
    ("3 tokens, greedy", [8, 6, 7], SamplingParams(temperature=0, max_tokens=4)),
    ("8 tokens, top_p 0.9", [1] * 7 + [3], SamplingParams(temperature=0.7, top_p=0.9, max_tokens=4)),
    ("100 tokens, top_k 5", list(range(3, 103)), SamplingParams(temperature=0.7, top_k=5, max_tokens=4)),
    ("20 tokens, n=2", list(range(3, 23)), SamplingParams(temperature=0.7, n=2, max_tokens=4)),
]


def _cache_entries() -> set[str]:
    root = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
    return {p for p in glob.glob(f"{root}/*/*.json") if not os.path.basename(p).startswith("__grp__")}


def main() -> None:
    engine = LLMEngine(engine_config_from_args(build_parser().parse_args(["serve", *sys.argv[1:]])))
    seen = _cache_entries()
    for i, (label, ids, params) in enumerate(CASES):
        t = time.perf_counter()
        first = None
        engine.add_request(f"probe-{i}", None, ids, params)
        while engine.has_unfinished_requests():
            outputs = engine.step()
            if first is None and any(o.outputs and o.outputs[0].token_ids for o in outputs):
                first = time.perf_counter() - t
        new = _cache_entries() - seen
        seen |= new
        compiled = ", ".join(sorted(os.path.basename(p).removesuffix(".json") for p in new)) or "-"
        print(f"{label:32s} first token {1e3 * (first or 0):8.1f} ms  total {1e3 * (time.perf_counter() - t):8.1f} ms"
              f"  compiled: {compiled}", flush=True)


if __name__ == "__main__":
    main()
