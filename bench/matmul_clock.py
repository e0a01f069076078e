"""How fast bf16 matmuls run once the card has been busy a while: the burst rate `ember bench` measured before,
the rate in short windows over a long run of back-to-back matmuls, and the 8B model's projection shapes at the
offline steps' token counts, interleaved with the square matmul once the card is warm.

    python bench/matmul_clock.py [--seconds 30] [--model llama-3.1-8b-instruct]

Run `nvidia-smi --query-gpu=clocks.sm,power.draw,clocks_throttle_reasons.active --format=csv -lms 1000` beside
it to see the clock and the power cap.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ember.bench.roofline import projection_shapes
from ember.config import EngineConfig
from ember.model.config import ModelArchConfig
from ember.model.loader import resolve_model

N = 8192


def _tflops(fn, flops: float, reps: int) -> float:  # noqa: ANN001
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return flops * reps / (start.elapsed_time(end) / 1e3) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--model", default="llama-3.1-8b-instruct", help="a shipped config: whose projections to time")
    args = ap.parse_args()
    dev = torch.device("cuda")
    a = torch.randn(N, N, device=dev, dtype=torch.bfloat16)
    b = torch.randn(N, N, device=dev, dtype=torch.bfloat16)
    square = 2 * N ** 3
    _tflops(lambda: a @ b, square, 3)  # cuBLAS's first call
    torch.cuda.synchronize()
    time.sleep(3)  # idle again
    print(f"burst (10 matmuls, as ember bench measures): {_tflops(lambda: a @ b, square, 10):.0f} TFLOP/s")
    t0 = time.perf_counter()
    windows = []
    while time.perf_counter() - t0 < args.seconds:
        windows.append((time.perf_counter() - t0, _tflops(lambda: a @ b, square, 100)))
    print("back-to-back, (s, TFLOP/s) per window:", " ".join(f"{t:.1f}:{r:.0f}" for t, r in windows))
    arch = ModelArchConfig.from_hf(resolve_model(EngineConfig(model=args.model, load_format="dummy")).hf_config)
    ws = {k: torch.randn(n, k_, device=dev, dtype=torch.bfloat16) for k, (n, k_) in projection_shapes(arch).items()}
    for m in (4864, 5005, 5120, 8192, 16384):
        xs = {k: torch.randn(m, w.shape[1], device=dev, dtype=torch.bfloat16) for k, w in ws.items()}
        layer = sum(2 * m * w.shape[0] * w.shape[1] for w in ws.values())
        rate = _tflops(lambda xs=xs: [F.linear(xs[k], w) for k, w in ws.items()], layer, 10)
        print(f"M={m}: the four projections {rate:.0f} TFLOP/s, square right after "
              f"{_tflops(lambda: a @ b, square, 20):.0f}")


if __name__ == "__main__":
    main()
