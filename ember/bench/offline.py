"""`ember bench latency` and `ember bench throughput`: the engine offline, against the roofline of the same run."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from ember.bench.roofline import (
    Roofline,
    attention_flops,
    kv_bytes_per_token,
    matmul_flops_per_token,
    measure,
    measure_matmul_sustained,
    model_weight_bytes,
)
from ember.config import EngineConfig
from ember.engine.heap import freeze_startup_heap
from ember.engine.llm_engine import LLMEngine
from ember.sampling_params import SamplingParams


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Avoid the low ids, where tokenizers keep their special tokens.
    return torch.randint(1000, vocab, (n, length), generator=g).tolist()


def run_to_completion(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams,
                      tag: str) -> tuple[float, list[Any]]:
    t = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", None, p, params.clone())
    done = []
    while engine.has_unfinished_requests():
        done.extend(o for o in engine.step() if o.finished)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, done


def run_info(device: torch.device, dtype: torch.dtype, cuda_graphs: bool) -> dict[str, Any]:
    """What a result was measured on: date, card, versions, dtype."""
    import ember

    dev = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {"date": time.strftime("%Y-%m-%d"), "device": dev, "torch": torch.__version__,
            "ember": ember.__version__, "dtype": str(dtype).removeprefix("torch."), "cuda_graphs": cuda_graphs}


def _engine_info(engine: LLMEngine, args: argparse.Namespace) -> dict[str, Any]:
    # With tensor parallelism the rates are measured on rank 0's GPU and the rooflines are the group's: each rank
    # reads its own weights (those this process holds, the lm_head included) and 1/N of the KV cache, and the
    # FLOPs are shared evenly over the N GPUs.
    return {**run_info(engine.device, engine.dtype, engine.cuda_graphs_enabled),
            "quantization": engine.loaded.quantization, "tensor_parallel_size": engine.tp.size,
            "kv_cache_dtype": str(engine.kv_dtype).removeprefix("torch."), "heap_frozen": args.freeze_heap}


def _build_engine(args: argparse.Namespace, config: EngineConfig) -> LLMEngine:
    engine = LLMEngine(config)
    if args.freeze_heap:
        freeze_startup_heap()
    return engine


def bench_latency(args: argparse.Namespace, config: EngineConfig) -> dict[str, Any]:
    engine = _build_engine(args, config)
    roof = measure(engine.device, engine.dtype, fp8=engine.loaded.quantization == "fp8")
    prompts = random_prompts(args.batch_size, args.input_len, engine.arch.vocab_size)
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    run_to_completion(engine, prompts, sp.clone(max_tokens=8), "warm")
    ttfts, e2es = [], []
    for it in range(args.iters):
        ttft, _ = run_to_completion(engine, prompts, sp.clone(max_tokens=1), f"p{it}")
        e2e, outs = run_to_completion(engine, prompts, sp, f"e{it}")
        assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
        ttfts.append(ttft)
        e2es.append(e2e)
    ttft, e2e = sorted(ttfts)[len(ttfts) // 2], sorted(e2es)[len(e2es) // 2]
    tpot = (e2e - ttft) / (args.output_len - 1)
    b = args.batch_size
    avg_ctx = args.input_len + args.output_len / 2
    weights = model_weight_bytes(engine.model)
    ranks = engine.tp.size
    floor = roof.step_time(engine.arch, engine.dtype, b / ranks, b * avg_ctx / ranks,
                           attention_flops(engine.arch, b, avg_ctx) / ranks, lm_head_rows=b, weight_bytes=weights,
                           kv_dtype=engine.kv_dtype)
    return {**_engine_info(engine, args), "bench": "latency", "batch_size": b, "input_len": args.input_len,
            "output_len": args.output_len, "ttft_s": ttft, "e2e_s": e2e, "tpot_ms": tpot * 1e3,
            "decode_tok_s_per_seq": 1 / tpot, "decode_tok_s": b / tpot,
            **roof.rates(), "weight_gb": weights / 1e9,
            "roofline_tpot_ms": floor * 1e3, "roofline_tok_s": b / floor, "pct_of_roofline": 100 * floor / tpot}


def throughput_floor(roof: Roofline, engine: LLMEngine, n: int, inp: int, out: int) -> float:
    """FLOPs of the whole workload over the matmul rates (bytes are not the limit at this batch size), shared
    evenly over the tensor-parallel ranks but for the lm_head's, which rank 0 alone runs."""
    arch = engine.arch
    tokens = n * (inp + out)
    # Every token goes through the layers; only the sampled ones (the last prompt token, then each output
    # token but the last) through the lm_head.
    lm_head = 2 * arch.vocab_size * arch.hidden_size
    layers = (matmul_flops_per_token(arch) - lm_head) * tokens
    # Causal prefill averages inp/2 keys per query; decode tokens see inp + j keys.
    layers += n * (attention_flops(arch, inp, inp / 2) + attention_flops(arch, out, inp + out / 2))
    ranks = engine.tp.size
    return roof.compute_time(arch, layers / ranks + lm_head * n * out, tokens / ranks)


def bench_throughput(args: argparse.Namespace, config: EngineConfig) -> dict[str, Any]:
    engine = _build_engine(args, config)
    roof = measure(engine.device, engine.dtype, fp8=engine.loaded.quantization == "fp8")
    prompts = random_prompts(args.num_prompts, args.input_len, engine.arch.vocab_size)
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    run_to_completion(engine, prompts[:8], sp.clone(max_tokens=4), "warm")
    elapsed, outs = run_to_completion(engine, prompts, sp, "tput")
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(p) for p in prompts)
    floor = throughput_floor(roof, engine, args.num_prompts, args.input_len, args.output_len)
    res = {**_engine_info(engine, args), "bench": "throughput", "num_prompts": args.num_prompts,
           "input_len": args.input_len, "output_len": args.output_len, "elapsed_s": elapsed,
           "requests_s": args.num_prompts / elapsed, "output_tok_s": n_out / elapsed,
           "total_tok_s": (n_in + n_out) / elapsed, **roof.rates(), "roofline_s": floor,
           "pct_of_roofline": 100 * floor / elapsed}
    if args.sustained_seconds > 0:
        # Measured right after the run, with the card as hot as the run left it: the matmul rate a workload of
        # this length can count on (see `measure_matmul_sustained`), beside the burst rate above.
        fp8 = roof.fp8_matmul_rate is not None
        held = Roofline(roof.bandwidth, measure_matmul_sustained(engine.device, engine.dtype, args.sustained_seconds),
                        # the card is at its sustained clock by now: a short warm-up for the FP8 kernel
                        measure_matmul_sustained(engine.device, engine.dtype, 1.0, fp8=True) if fp8 else None)
        held_floor = throughput_floor(held, engine, args.num_prompts, args.input_len, args.output_len)
        res |= {"sustained_matmul_tflop_s": held.matmul_rate / 1e12, "roofline_sustained_s": held_floor,
                "pct_of_sustained_roofline": 100 * held_floor / elapsed}
        if fp8:
            res["sustained_fp8_matmul_tflop_s"] = held.fp8_matmul_rate / 1e12
    st = engine.stats()
    return res | {"kv_blocks": engine.block_manager.num_blocks, "preemptions": st["num_preemptions"],
                  "kv_bytes_per_token": kv_bytes_per_token(engine.arch, engine.kv_dtype)}


def print_result(res: dict[str, Any], path: str | None) -> None:
    width = max(len(k) for k in res)
    for k, v in res.items():
        print(f"{k:{width}s}  {v:.4g}" if isinstance(v, float) else f"{k:{width}s}  {v}")
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=2)
