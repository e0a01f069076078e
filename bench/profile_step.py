"""Where a step's time goes on the GPU: kernels of a prefill step, host functions of decode steps.

    python bench/profile_step.py llama-3.1-8b-instruct [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from ember.bench.offline import random_prompts
from ember.config import EngineConfig
from ember.engine.llm_engine import LLMEngine
from ember.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--prefill-seqs", type=int, default=8)
    args = ap.parse_args()
    eng = LLMEngine(EngineConfig(model=args.model, load_format="dummy", tokenizer=args.tokenizer,
                                 max_model_len=4096, max_num_seqs=8))
    vocab = eng.arch.vocab_size
    # (a) one prefill step of prefill_seqs x 1024 tokens, kernel by kernel.
    for i, p in enumerate(random_prompts(args.prefill_seqs, 1024, vocab)):
        eng.add_request(f"pf{i}", None, p, SamplingParams(max_tokens=1, ignore_eos=True))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        eng.step()
        torch.cuda.synchronize()
    while eng.has_unfinished_requests():
        eng.step()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    # (b) batch-1 decode: graph replay alone, then whole steps under cProfile.
    g = eng.runner.graphs
    if g is not None:
        for _ in range(3):
            g.graphs[1].replay()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            g.graphs[1].replay()
        torch.cuda.synchronize()
        print(f"graph replay, batch 1: {(time.perf_counter() - t) / 50 * 1e3:.3f} ms")
    eng.add_request("dec", None, random_prompts(1, 32, vocab)[0], SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(5):
        eng.step()
    pr = cProfile.Profile()
    t = time.perf_counter()
    pr.enable()
    for _ in range(100):
        eng.step()
    pr.disable()
    print(f"decode step, batch 1, under cProfile: {(time.perf_counter() - t) / 100 * 1e3:.3f} ms")
    pstats.Stats(pr).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
