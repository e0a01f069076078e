"""Where the offline-throughput workload's time goes: steps of its steady state, kernel families and host time.

    python bench/profile_offline.py llama-3.1-8b-instruct --tokenizer DIR [--num-prompts 600 --skip 150 --steps 20]

Runs `--num-prompts` random prompts of (input, output) lengths as `ember bench throughput` does, lets
`--skip` steps pass (the running batch fills up), then profiles `--steps` steps: their composition (prefill
tokens, decodes), wall time, the GPU's kernel time by family, and the difference (time the GPU had no kernel
to run: host work it waited for).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from ember.bench.offline import random_prompts
from ember.bench.profiling import kernel_family, kernel_times
from ember.config import EngineConfig
from ember.engine.llm_engine import LLMEngine
from ember.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--num-prompts", type=int, default=600)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--skip", type=int, default=150)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    eng = LLMEngine(EngineConfig(model=args.model, load_format="dummy", tokenizer=args.tokenizer,
                                 max_model_len=4096, max_num_seqs=args.max_num_seqs,
                                 max_num_batched_tokens=args.max_num_batched_tokens,
                                 async_scheduling=args.async_scheduling))
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
    for i, p in enumerate(random_prompts(args.num_prompts, args.input_len, eng.arch.vocab_size)):
        eng.add_request(f"r{i}", None, p, params)
    t0 = time.perf_counter()
    for _ in range(args.skip):
        eng.step()
    torch.cuda.synchronize()
    comp = {"prefill_tokens": 0, "decodes": 0}
    orig_schedule = eng.scheduler.schedule

    def counting_schedule(*args, **kwargs):  # noqa: ANN202, ANN002, ANN003
        out = orig_schedule(*args, **kwargs)
        for item in out.scheduled:
            if item.num_new_tokens == 1 and item.seq.num_computed_tokens >= item.seq.num_prompt_tokens:
                comp["decodes"] += 1
            else:
                comp["prefill_tokens"] += item.num_new_tokens
        return out

    eng.scheduler.schedule = counting_schedule
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(args.steps):
            eng.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    eng.scheduler.schedule = orig_schedule
    fams: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    for name, (dev_us, _) in kernel_times(prof).items():
        fams[kernel_family(name)] += dev_us
        kernels[name] += dev_us
    while eng.has_unfinished_requests():
        eng.step()
    total = time.perf_counter() - t0
    n = args.steps
    gpu_us = sum(fams.values())
    res = {
        "steps": n, "wall_ms_per_step": wall / n * 1e3, "gpu_ms_per_step": gpu_us / n / 1e3,
        "idle_ms_per_step": (wall * 1e6 - gpu_us) / n / 1e3,
        "prefill_tokens_per_step": comp["prefill_tokens"] / n, "decodes_per_step": comp["decodes"] / n,
        "families_ms_per_step": {k: v / n / 1e3 for k, v in sorted(fams.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms_per_step": {k[:90]: v / n / 1e3
                                    for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:15]},
        "whole_run_s": total,
    }
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
