"""Where the offline-throughput workload's time goes: steps of its steady state, kernel families and host time.

    python bench/profile_offline.py llama-3.1-8b-instruct --tokenizer DIR [--num-prompts 600 --skip 150 --steps 20]

Runs `--num-prompts` random prompts of (input, output) lengths as `ember bench throughput` does, lets
`--skip` steps pass (the running batch fills up), then profiles `--steps` steps: their composition (prefill
tokens, decodes), wall time, the GPU's kernel time by family, and the difference (time the GPU had no kernel
to run: host work it waited for).

With `--timeline` it instead runs the whole workload unprofiled and records every step: its prefill tokens,
decodes and wall time (the time between two `step()` returns), then sums the run by kind of step (prefill only,
mixed, decodes only), each beside its compute floor at the matmul rate measured first: where the run's time goes
that the FLOP roofline does not pay for.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from ember.bench.offline import random_prompts
from ember.bench.profiling import kernel_family, kernel_times
from ember.bench.roofline import matmul_flops_per_token, measure_matmul
from ember.config import EngineConfig
from ember.engine.llm_engine import LLMEngine
from ember.sampling_params import SamplingParams


def _composition(out: object) -> tuple[int, int]:
    """(prefill tokens, decodes) of a scheduler output."""
    prefill = decodes = 0
    for item in out.scheduled:  # type: ignore[attr-defined]
        if item.num_new_tokens == 1 and item.seq.num_computed_tokens >= item.seq.num_prompt_tokens:
            decodes += 1
        else:
            prefill += item.num_new_tokens
    return prefill, decodes


def timeline(eng: LLMEngine, args: argparse.Namespace, params: SamplingParams) -> dict:
    dtype = next(eng.model.parameters()).dtype
    rate = measure_matmul(eng.device, dtype)
    per_token = matmul_flops_per_token(eng.arch)
    lm_head = 2 * eng.arch.vocab_size * eng.arch.hidden_size
    scheduled: list[tuple[int, int]] = []
    orig_schedule = eng.scheduler.schedule

    def recording_schedule(*a, **kw):  # noqa: ANN202, ANN002, ANN003
        out = orig_schedule(*a, **kw)
        scheduled.append(_composition(out))
        return out

    eng.scheduler.schedule = recording_schedule
    for i, p in enumerate(random_prompts(args.num_prompts, args.input_len, eng.arch.vocab_size)):
        eng.add_request(f"r{i}", None, p, params)
    walls: list[float] = []
    sync = torch.cuda.synchronize if eng.device.type == "cuda" else (lambda: None)
    sync()
    t0 = last = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
        now = time.perf_counter()
        walls.append(now - last)
        last = now
    sync()
    total = time.perf_counter() - t0
    eng.scheduler.schedule = orig_schedule
    # With asynchronous scheduling a step() call schedules step i+1 and returns step i's results, so the
    # schedules and the wall times are paired in order; the few trailing ones are drained steps.
    kinds: dict[str, dict[str, float]] = {}
    steps = []
    for (prefill, decodes), wall in zip(scheduled, walls, strict=False):
        kind = "decodes only" if prefill == 0 else "prefill only" if decodes == 0 else "mixed"
        # Compute floor: every new token through the layers, sampled rows (one per sequence) through the lm_head;
        # attention FLOPs left out (~2 % here), as in the step floor of `ember bench serve`'s roofline.
        rows = decodes + (1 if prefill else 0)
        floor = ((per_token - lm_head) * (prefill + decodes) + lm_head * rows) / rate
        k = kinds.setdefault(kind, {"steps": 0, "wall_s": 0.0, "floor_s": 0.0, "prefill_tokens": 0, "decodes": 0})
        k["steps"] += 1
        k["wall_s"] += wall
        k["floor_s"] += floor
        k["prefill_tokens"] += prefill
        k["decodes"] += decodes
        steps.append([prefill, decodes, round(wall * 1e3, 3)])
    for k in kinds.values():
        k["pct_of_floor"] = 100 * k["floor_s"] / k["wall_s"]
    return {"matmul_tflop_s": rate / 1e12, "whole_run_s": total, "steps_recorded": len(steps),
            "by_kind": kinds, "steps": steps}


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
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--timeline", action="store_true", help="record every step of the whole run instead")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    eng = LLMEngine(EngineConfig(model=args.model, load_format="dummy", tokenizer=args.tokenizer,
                                 max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                                 max_num_batched_tokens=args.max_num_batched_tokens,
                                 async_scheduling=args.async_scheduling))
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
    if args.timeline:
        res = timeline(eng, args, params)
        print(json.dumps(res, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return
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
