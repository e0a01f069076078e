"""Decode-batch matmuls with FP8 weights on the GPU: ember's FP8 GEMV (batch 1) against cuBLASLt's row-wise
scaled FP8 matmul (with its activation quantization), the bf16 cuBLAS matmul, and cuBLASLt's FP8 matmul with one
scale per operand (the matmul alone: what per-tensor weight scales would allow), as a decode step runs them.

    python bench/fp8_gemv.py [--model llama-3.1-8b-instruct] [--m 1 4 16 64] [--sweep] [--json out.json]

Each timing is a CUDA-graph replay of one product over enough distinct copies of the weight (>= 1.5 GB) that
nothing is served from L2, as in a real step. Reports microseconds per product and the weight bytes over that
time beside a device copy's rate measured now. `--sweep` also times a grid of launch shapes and prints the
fastest per (shape, m). Last, the projections of a whole forward pass (32 layers, each its own weights) in one
graph, each way.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import torch.nn.functional as F

from ember.bench.profiling import graph_time
from ember.bench.roofline import measure_bandwidth, projection_shapes
from ember.config import EngineConfig
from ember.kernels.fp8_gemv import GemvConfig, default_config, fp8_gemv
from ember.model.config import ModelArchConfig
from ember.model.fp8 import quantize_activations, quantize_rows
from ember.model.loader import resolve_model


def _sweep_configs() -> list[GemvConfig]:
    return [GemvConfig(bn, bk, warps, stages)
            for bn, bk, warps, stages in itertools.product((1, 2, 4, 8), (512, 1024, 2048), (2, 4), (4, 6))
            if bn * bk <= 8192]


def _scaled_mm(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    xq, xs = quantize_activations(x)
    return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=s.reshape(1, -1), out_dtype=x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b-instruct")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    one = torch.ones((), device=dev)  # a unit scale for the tensor-wise products
    arch = ModelArchConfig.from_hf(resolve_model(EngineConfig(model=args.model, load_format="dummy")).hf_config)
    copy_bw = measure_bandwidth(dev)
    print(f"device copy: {copy_bw / 1e9:,.0f} GB/s  ({torch.cuda.get_device_name()})")
    results: dict = {"copy_gb_s": copy_bw / 1e9, "device": torch.cuda.get_device_name(), "products": []}
    for name, (n, k) in projection_shapes(arch).items():
        copies = max(2, math.ceil(1.5e9 / (n * k)))
        ws = [quantize_rows(torch.randn(n, k, device=dev) / k ** 0.5) for _ in range(copies)]
        ws = [(q, s.reshape(-1).contiguous()) for q, s in ws]
        wbf = [torch.randn(n, k, device=dev, dtype=dtype) for _ in range(max(2, copies // 2))]
        for m in args.m:
            x = torch.randn(m, k, device=dev, dtype=dtype)

            def run_gemv(cfg: GemvConfig | None, x: torch.Tensor = x, ws: list = ws) -> None:
                for q, s in ws:
                    fp8_gemv(x, q, s, config=cfg)

            def run_scaled(x: torch.Tensor = x, ws: list = ws) -> None:
                for q, s in ws:
                    _scaled_mm(x, q, s)

            xq8 = x.to(torch.float8_e4m3fn)

            def run_tensorwise(xq8: torch.Tensor = xq8, ws: list = ws) -> None:
                for q, _ in ws:  # the matmul alone, one scale per operand (cuBLASLt picks other kernels)
                    torch._scaled_mm(xq8, q.t(), scale_a=one, scale_b=one, out_dtype=dtype)

            def run_bf16(x: torch.Tensor = x, wbf: list = wbf) -> None:
                for w in wbf:
                    F.linear(x, w)

            t_gemv = graph_time(lambda: run_gemv(None)) / copies if m == 1 else float("nan")
            t_scaled = graph_time(run_scaled) / copies
            t_bf16 = graph_time(run_bf16) / len(wbf)
            t_tensorwise = graph_time(run_tensorwise) / copies
            row = {"name": name, "n": n, "k": k, "m": m, "gemv_us": t_gemv * 1e6, "scaled_mm_us": t_scaled * 1e6,
                   "bf16_us": t_bf16 * 1e6, "tensorwise_mm_us": t_tensorwise * 1e6,
                   "default": str(default_config(n, k)) if m == 1 else None}
            line = (f"{name:13s} m={m:3d} n={n:6d} k={k:5d}  gemv {t_gemv * 1e6:6.1f} us "
                    f"{n * k / t_gemv / 1e9:5.0f} GB/s | scaled_mm {t_scaled * 1e6:6.1f} | bf16 {t_bf16 * 1e6:6.1f} "
                    f"| tensorwise {t_tensorwise * 1e6:6.1f}")
            if args.sweep and m == 1:
                timed = []
                for c in _sweep_configs():
                    try:
                        timed.append((graph_time(lambda c=c: run_gemv(c), reps=5) / copies, c))
                    except Exception as e:  # a shape the compiler refuses (registers, shared memory)
                        print(f"   skip {c}: {type(e).__name__}")
                timed.sort(key=lambda tc: tc[0])
                row["sweep"] = [{"us": t * 1e6, "config": str(c)} for t, c in timed[:5]]
                best_t, best_c = timed[0]
                line += f" | best {best_t * 1e6:6.1f} us {n * k / best_t / 1e9:5.0f} GB/s {best_c}"
            print(line, flush=True)
            results["products"].append(row)
        del ws, wbf
        torch.cuda.empty_cache()
    prods = projection_shapes(arch)
    layers = [{name: quantize_rows(torch.randn(n, k, device=dev) / k ** 0.5) for name, (n, k) in prods.items()}
              for _ in range(arch.num_hidden_layers)]
    layers = [{name: (q, s.reshape(-1).contiguous()) for name, (q, s) in layer.items()} for layer in layers]
    bf16_layers = [{name: torch.randn(n, k, device=dev, dtype=dtype) for name, (n, k) in prods.items()}
                   for _ in range(arch.num_hidden_layers)]
    total_bytes = sum(q.numel() for layer in layers for q, _ in layer.values())
    for m in args.m:
        inputs = {name: torch.randn(m, k, device=dev, dtype=dtype) for name, (_, k) in prods.items()}

        def forward(kind: str, inputs: dict = inputs) -> None:
            for layer, bf16_layer in zip(layers, bf16_layers, strict=True):
                for name, (q, s) in layer.items():
                    if kind == "gemv":
                        fp8_gemv(inputs[name], q, s)
                    elif kind == "scaled_mm":
                        _scaled_mm(inputs[name], q, s)
                    elif kind == "tensorwise":  # what ember runs for 2-64 rows (Fp8Linear.forward)
                        xq, xs = quantize_activations(inputs[name])
                        torch._scaled_mm(xq, q.t(), scale_a=one, scale_b=s[:1].reshape(()), out_dtype=dtype).mul_(xs)
                    else:
                        F.linear(inputs[name], bf16_layer[name])

        row = {"m": m, "fp8_bytes": total_bytes}
        line = f"forward projections m={m} [{total_bytes / 1e9:.2f} GB in FP8]:"
        for kind in ("bf16", "scaled_mm", "gemv" if m == 1 else "tensorwise"):
            t = graph_time(lambda kind=kind: forward(kind))
            row[f"{kind}_us"] = t * 1e6
            line += f"  {kind} {t * 1e6:6.0f} us"
        print(line, flush=True)
        results.setdefault("forward", []).append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
