"""`ember bench serve`: load a running server the way `vllm bench serve` does, and report its metrics.

TTFT: request sent -> first streamed token. TPOT: (E2E - TTFT) / (output tokens - 1). ITL: gaps between
streamed chunks. E2E: request sent -> last chunk. Random prompts are sent as token ids with `ignore_eos`, so
every request produces exactly --output-len tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


async def _one(client: Any, url: str, model: str, prompt: list[int], out_len: int, headers: dict[str, str]
               ) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    res = RequestResult(ok=False)
    t0 = time.perf_counter()
    last = t0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if res.ttft == 0.0:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last)
                last = now
        res.e2e = last - t0
        res.ok = res.output_tokens == out_len
        if not res.ok:
            res.error = f"got {res.output_tokens} tokens, wanted {out_len}"
    except Exception as e:  # a failed request is counted, never fatal to the benchmark
        res.error = repr(e)
    return res


def _stats(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    s = sorted(xs)
    return {"mean": statistics.fmean(s) * 1e3, "median": statistics.median(s) * 1e3,
            "p99": s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))] * 1e3}


async def run_load(url: str, model: str, prompts: list[list[int]], out_len: int, concurrency: int,
                   rate: float, api_key: str | None) -> tuple[list[RequestResult], float]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def gated(p: list[int]) -> RequestResult:
            async with sem:
                return await _one(client, url, model, p, out_len, headers)

        tasks = []
        t0 = time.perf_counter()
        rng = random.Random(0)
        for p in prompts:
            tasks.append(asyncio.create_task(gated(p)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0


def serving_roofline(model_cfg: str, concurrency: int, inp: int, out: int,
                     quantization: str | None = None, kv_cache_dtype: str = "auto") -> dict[str, float]:
    """Floor for the TPOT of a steady state of `concurrency` requests (measured rates of this device).

    Each step decodes one token per running request, and prefills the prompts of the requests that replace
    the finished ones: concurrency / out arrivals per step, inp tokens each. `quantization="fp8"`: the server
    runs FP8 matmuls; the projections count a byte a weight and their FLOPs go at the FP8 rate (the lm_head and
    attention at the bf16 one). `kv_cache_dtype="fp8"`: the server runs `--kv-cache-dtype fp8`, a byte a K/V value.
    """
    import torch

    from ember.bench.roofline import attention_flops, measure, weight_bytes_per_step
    from ember.config import EngineConfig
    from ember.engine.kv_cache import kv_cache_dtype as resolve_kv_dtype
    from ember.model.config import ModelArchConfig
    from ember.model.loader import resolve_model

    arch = ModelArchConfig.from_hf(resolve_model(EngineConfig(model=model_cfg, load_format="dummy")).hf_config)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    roof = measure(dev, dtype, fp8=quantization == "fp8")
    prefill = concurrency * inp / out
    ctx = inp + out / 2
    attn = attention_flops(arch, concurrency, ctx) + attention_flops(arch, int(prefill), inp / 2)
    step = roof.step_time(arch, dtype, int(concurrency + prefill), concurrency * ctx, attn,
                          lm_head_rows=concurrency, weight_bytes=weight_bytes_per_step(arch, dtype, quantization),
                          kv_dtype=resolve_kv_dtype(kv_cache_dtype, dtype, dev))
    return {"roofline_step_ms": step * 1e3, "roofline_prefill_tokens_per_step": prefill, **roof.rates()}


def plot(results: list[RequestResult], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].hist([r.ttft * 1e3 for r in ok], bins=40)
    ax[0].set_title("TTFT (ms)")
    ax[1].hist([r.tpot * 1e3 for r in ok if r.tpot], bins=40)
    ax[1].set_title("TPOT (ms)")
    ax[2].hist([x * 1e3 for r in ok for x in r.itl], bins=60)
    ax[2].set_title("ITL (ms)")
    ax[2].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run_serve_bench(args: argparse.Namespace) -> int:
    import httpx

    url = args.base_url.rstrip("/")
    model = args.model or httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    vocab = args.vocab_size
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(1000, vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    rate = float(args.request_rate)
    results, elapsed = asyncio.run(run_load(url, model, prompts, args.output_len, args.max_concurrency, rate,
                                            args.api_key))
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    summary: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "model": model, "num_prompts": args.num_prompts,
        "input_len": args.input_len, "output_len": args.output_len, "max_concurrency": args.max_concurrency,
        "request_rate": args.request_rate, "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": elapsed, "request_throughput": len(ok) / elapsed, "output_tok_s": out_tokens / elapsed,
        "total_tok_s": (out_tokens + len(ok) * args.input_len) / elapsed,
    }
    for name, xs in (("ttft", [r.ttft for r in ok]), ("tpot", [r.tpot for r in ok if r.tpot]),
                     ("itl", [x for r in ok for x in r.itl]), ("e2e", [r.e2e for r in ok])):
        for k, v in _stats(xs).items():
            summary[f"{k}_{name}_ms"] = v
    if args.roofline_model:
        roof = serving_roofline(args.roofline_model, args.max_concurrency, args.input_len, args.output_len,
                                args.roofline_quantization, args.roofline_kv_cache_dtype)
        summary.update(roof)
        summary["roofline_quantization"] = args.roofline_quantization
        summary["roofline_kv_cache_dtype"] = args.roofline_kv_cache_dtype
        summary["tpot_p50_over_roofline"] = summary["median_tpot_ms"] / roof["roofline_step_ms"]
    errors = [r.error for r in results if not r.ok][:5]
    if errors:
        summary["first_errors"] = errors
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        print(f"{k:{width}s}  {v:.4g}" if isinstance(v, float) else f"{k:{width}s}  {v}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    if args.plot:
        plot(results, args.plot, f"{model}: {args.max_concurrency} concurrent, {args.input_len} in / "
                                  f"{args.output_len} out")
    return 0 if not errors else 1


def add_serve_bench(bsub: Any) -> None:
    q = bsub.add_parser("serve", help="load a running server (vllm bench serve metrics), JSON and PNG output",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--base-url", default="http://127.0.0.1:8000")
    q.add_argument("--model", default=None, help="served model name (default: the server's first)")
    q.add_argument("--num-prompts", type=int, default=200)
    q.add_argument("--input-len", type=int, default=1024)
    q.add_argument("--output-len", type=int, default=128)
    q.add_argument("--max-concurrency", type=int, default=64)
    q.add_argument("--request-rate", default="inf", help="requests/s (Poisson arrivals), or inf")
    q.add_argument("--vocab-size", type=int, default=49152, help="random prompt ids are drawn below this")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--api-key", default=None)
    q.add_argument("--roofline-model", default=None,
                   help="a shipped config (e.g. llama-3.1-8b-instruct): print the TPOT roofline of this device")
    q.add_argument("--roofline-quantization", default=None, choices=["fp8"],
                   help="the server runs --quantization fp8: FP8 weight bytes and matmul rate in the roofline")
    q.add_argument("--roofline-kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="the server runs --kv-cache-dtype fp8: a byte a K/V value in the roofline")
    q.add_argument("--output-json", default=None)
    q.add_argument("--plot", default=None, help="write a PNG of the TTFT/TPOT/ITL distributions here")
    q.set_defaults(handler=run_serve_bench)
