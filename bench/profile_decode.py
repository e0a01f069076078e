"""Where a decode step's time goes on the GPU: kernels inside the captured graph, and host time around it.

    python bench/profile_decode.py llama-3.1-8b-instruct --tokenizer DIR [--batch 1 --context 160]

Prints, for one decode step at the given batch and context: each kernel family's device time per step, the
matmuls' achieved bandwidth (weight bytes over their time, beside the device copy rate measured now), the
graph replay's wall time, a whole engine step's wall time (the difference is host work that the GPU waits
for, and the GPU work outside the graph), and that outside work by name: input copies, sampling, read-back. Also
the device's idle gaps during engine steps, the longest `step()` call and the garbage collections among those
steps (`--freeze-heap` freezes the startup heap first, as the server does).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from ember.bench.offline import random_prompts
from ember.bench.profiling import GcPauses, idle_gaps, kernel_family, kernel_times
from ember.bench.roofline import measure_bandwidth, model_weight_bytes
from ember.config import EngineConfig
from ember.engine.heap import freeze_startup_heap
from ember.engine.llm_engine import LLMEngine
from ember.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=160)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=1.0, help="0: greedy (the graph's own argmax)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--quantization", "-q", choices=["fp8", "none"], default=None)
    ap.add_argument("--freeze-heap", action="store_true", help="freeze the startup heap first, as the server does")
    args = ap.parse_args()
    eng = LLMEngine(EngineConfig(model=args.model, load_format="dummy", tokenizer=args.tokenizer,
                                 max_model_len=4096, max_num_seqs=max(8, args.batch),
                                 async_scheduling=args.async_scheduling, quantization=args.quantization))
    vocab = eng.arch.vocab_size
    for i, p in enumerate(random_prompts(args.batch, args.context, vocab)):
        eng.add_request(f"d{i}", None, p, SamplingParams(max_tokens=4000 - args.context, ignore_eos=True,
                                                          temperature=args.temperature))
    while any(s.is_prefilling for r in eng.requests.values() for s in r.seqs):
        eng.step()
    for _ in range(3):
        eng.step()
    g = eng.runner.graphs
    assert g is not None, "run without --enforce-eager: this profiles the captured decode graph"
    size = g.padded_size(args.batch)
    graph = g.graphs[size]
    if args.freeze_heap:
        freeze_startup_heap()
    # Timings first: the profiler's hooks slow launches down after it has run. Each step() call's host time too:
    # one that outlasts the step queued before it leaves the GPU idle.
    host_us = []
    with GcPauses() as pauses:
        t = time.perf_counter()
        for _ in range(50):
            t0 = time.perf_counter()
            eng.step()
            host_us.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t) / 50 * 1e3
    # These replays overwrite the in-flight step's greedy tokens with their own: the engine steps profiled after
    # them decode other (valid) token ids, at the same cost.
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        graph.replay()
    torch.cuda.synchronize()
    replay_ms = (time.perf_counter() - t) / 50 * 1e3

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            graph.replay()
        torch.cuda.synchronize()
    per_fam: dict[str, float] = defaultdict(float)
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, (dev_us, count) in kernel_times(prof).items():
        per_fam[kernel_family(name)] += dev_us / args.steps
        kernels[name][0] += dev_us / args.steps
        kernels[name][1] += count / args.steps

    # The same for whole engine steps: what runs on the GPU outside the graph (input copies, sampling, the
    # token read-back), per step, and how much of the step the GPU is busy at all.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            eng.step()
        torch.cuda.synchronize()
    span_us, idle_us, gaps = idle_gaps(prof.events())
    outside: dict[str, list[float]] = {}
    step_busy_us = 0.0
    for name, (dev_us, count) in kernel_times(prof).items():
        step_busy_us += dev_us / args.steps
        in_graph_us, in_graph_calls = kernels.get(name, (0.0, 0.0))
        extra_calls = count / args.steps - in_graph_calls
        if extra_calls > 0.5:
            outside[name] = [round(dev_us / args.steps - in_graph_us, 1), round(extra_calls, 1)]

    copy_bw = measure_bandwidth(eng.device)
    wbytes = model_weight_bytes(eng.model)  # as stored: FP8 projections count a byte a value
    gemm_us = per_fam.get("gemm", 0.0)
    total_us = sum(per_fam.values())
    res = {
        "batch": args.batch, "padded_batch": size, "context": args.context, "temperature": args.temperature,
        "async_scheduling": eng.async_scheduling, "quantization": eng.loaded.quantization,
        "device": torch.cuda.get_device_name(),
        "kernel_us_per_step": round(total_us, 1), "graph_replay_ms": round(replay_ms, 3),
        "engine_step_ms": round(step_ms, 3), "gpu_busy_us_per_engine_step": round(step_busy_us, 1),
        # step() returns once the step before is read back, so its time is mostly the wait for the GPU; the
        # largest ones show host stalls (a collection, say) that the GPU may have waited out.
        "step_call_us_median_max": [round(sorted(host_us)[len(host_us) // 2], 1), round(max(host_us), 1)],
        "gc_during_engine_steps": pauses.summary(), "heap_frozen": args.freeze_heap,
        # Engine steps under the profiler: the device idle between its operations, and the largest such gaps.
        "gpu_idle_us_per_engine_step": round(idle_us / args.steps, 1),
        "profiled_engine_step_us": round(span_us / args.steps, 1),
        "largest_idle_gaps_us": [(round(us, 1), before[:60], after[:60]) for us, before, after in gaps],
        "outside_graph_us_calls_per_step": outside, "families_us": {k: round(v, 1) for k, v in sorted(
            per_fam.items(), key=lambda kv: -kv[1])},
        "copy_bandwidth_GBps": round(copy_bw / 1e9, 1), "weight_bytes": wbytes,
        "gemm_achieved_GBps": round(wbytes / (gemm_us * 1e-6) / 1e9, 1) if gemm_us else None,
        "roofline_ms": round(wbytes / copy_bw * 1e3, 3),
    }
    print(json.dumps(res, indent=1))
    print(f"{'kernel':90s} {'us/step':>8s} {'calls':>6s}")
    for name, (us, calls) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"{name[:90]:90s} {us:8.1f} {calls:6.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
