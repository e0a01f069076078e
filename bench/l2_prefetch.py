"""Does prefetching the next weight into L2 during a batch-1 step's memory-idle kernels pay?

    python bench/l2_prefetch.py [--model llama-3.1-8b-instruct] [--json out.json]

A stand-in for the batch-1 decode step's layers: the four projections of each of 32 layers (distinct weights,
M = 1, cuBLAS as in the model) with spin kernels (`torch.cuda._sleep`, no memory traffic) where the step runs
its short kernels: before qkv (RMSNorm), between qkv and o (rotary/KV store + attention), before gate_up
(residual + RMSNorm) and before down (SiLU·mul). Each variant is one CUDA graph; prints microseconds a pass.

The prefetch is Hopper's `cp.async.bulk.prefetch.L2`, fire-and-forget. Tried in the model too (seventh session,
docs/PERFORMANCE.md) and dropped: a gain in this stand-in, a loss in the real step; the kernel lives here only.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ember.bench.profiling import graph_time
from ember.bench.roofline import measure_bandwidth, projection_shapes
from ember.config import EngineConfig
from ember.kernels.pdl import hopper_or_later, pdl_launch_args, pdl_release, pdl_wait, sm_count
from ember.model.config import ModelArchConfig
from ember.model.loader import resolve_model

MB = 1 << 20

# One program per SM at most, 32 threads each issuing one prefetch: an SM's copy engine takes about a 128-byte
# line a cycle, so a few programs issuing megabytes would run for microseconds and hold up the kernel after them
# (measured on an H200: 4 MB over two programs, ~8 us).
THREADS = 32


@triton.jit
def _prefetch_l2_kernel(ptr, nbytes, chunk, THREADS: tl.constexpr, USE_PDL: tl.constexpr):
    # With PDL the prefetch neither reads nor writes anything a kernel produces, so it is issued before the
    # wait: it overlaps the end of the kernel before. The wait stays, so that this kernel completes after that
    # one and the next kernel's own wait still covers it.
    pdl_release(USE_PDL)
    lane = tl.arange(0, THREADS)
    start = (tl.program_id(0) * THREADS + lane).to(tl.int64) * chunk
    size = tl.minimum(nbytes - start, chunk).to(tl.int32)
    # Byte offsets on an int8 pointer; lanes past the end get size <= 0 and are skipped.
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptr.to(tl.pointer_type(tl.int8)) + start, size], dtype=tl.int32, is_pure=False, pack=1)
    pdl_wait(USE_PDL)


def can_prefetch(t: torch.Tensor) -> bool:
    """Whether `prefetch_l2(t)` issues anything: a contiguous CUDA tensor on Hopper or later, 16-byte aligned."""
    return t.is_contiguous() and t.data_ptr() % 16 == 0 and hopper_or_later(t.device)


def prefetch_l2(t: torch.Tensor, max_bytes: int | None = None) -> None:
    """Ask L2 to fetch the first `max_bytes` (default: all) of `t`; a no-op where `can_prefetch(t)` is false."""
    if not can_prefetch(t):
        return
    nbytes = t.numel() * t.element_size()
    if max_bytes is not None:
        nbytes = min(nbytes, max_bytes)
    nbytes -= nbytes % 16  # the instruction takes multiples of 16 bytes
    if nbytes <= 0:
        return
    chunk = triton.cdiv(triton.cdiv(nbytes, sm_count(t.device) * THREADS), 16) * 16
    grid = (triton.cdiv(nbytes, chunk * THREADS),)
    _prefetch_l2_kernel[grid](t, nbytes, chunk, THREADS=THREADS, num_warps=1,
                              **pdl_launch_args(t.device))


def _cycles_per_us() -> float:
    """Spin-kernel cycles per microsecond, timed on a graph of one long spin."""
    cycles = 2_000_000
    return cycles / (graph_time(lambda: torch.cuda._sleep(cycles)) * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b-instruct")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    arch = ModelArchConfig.from_hf(resolve_model(EngineConfig(model=args.model, load_format="dummy")).hf_config)
    shapes = projection_shapes(arch)
    layers = arch.num_hidden_layers
    ws = [{name: torch.randn(n, k, device=dev, dtype=dtype) for name, (n, k) in shapes.items()}
          for _ in range(layers)]
    xs = {name: torch.randn(1, k, device=dev, dtype=dtype) for name, (n, k) in shapes.items()}
    weight_bytes = sum(w.numel() * w.element_size() for lw in ws for w in lw.values())
    copy_bw = measure_bandwidth(dev)
    cyc = _cycles_per_us()
    print(f"{torch.cuda.get_device_name()}: copy {copy_bw / 1e9:,.0f} GB/s, weights {weight_bytes / 1e9:.2f} GB, "
          f"spin {cyc:.0f} cycles/us")

    # Gap lengths (us) of the bs=1 profile (third session): RMSNorm ~1.9, rotary+KV store 2.7 + attention 8.3,
    # SiLU·mul 1.8.
    gaps = {"qkv_proj": 1.9, "o_proj": 11.0, "gate_up_proj": 1.9, "down_proj": 1.8}

    side = torch.cuda.Stream()

    def step(spin: bool, plan: dict[str, list[tuple[str, int]]], on_side: bool = False) -> None:
        # plan[name]: (weight, bytes) to prefetch at the start of the gap before `name`; `on_side`: from a
        # second stream that the main one joins at the end, so a prefetch never delays the kernels after it.
        main = torch.cuda.current_stream()
        for layer in range(layers):
            for name in shapes:
                for target, nbytes in plan.get(name, []):
                    if on_side:
                        side.wait_stream(main)
                        with torch.cuda.stream(side):
                            prefetch_l2(ws[layer][target], nbytes)
                    else:
                        prefetch_l2(ws[layer][target], nbytes)
                if spin:
                    torch.cuda._sleep(int(gaps[name] * cyc))
                F.linear(xs[name], ws[layer][name])
        if on_side:
            main.wait_stream(side)

    def o_plan(extra: int) -> dict[str, list[tuple[str, int]]]:
        plan: dict[str, list[tuple[str, int]]] = {"o_proj": [("o_proj", 64 * MB)]}
        if extra:
            plan["gate_up_proj"] = [("gate_up_proj", extra)]
            plan["down_proj"] = [("down_proj", extra)]
            plan["qkv_proj"] = [("qkv_proj", extra)]
        return plan

    variants = {
        "matmuls only": (False, {}, False),
        "with gaps": (True, {}, False),
        "gaps + o_proj prefetched": (True, o_plan(0), False),
        "gaps + o_proj prefetched, side stream": (True, o_plan(0), True),
        "gaps + o_proj + 4 MB of the others": (True, o_plan(4 * MB), False),
        "gaps + o_proj + 8 MB of the others": (True, o_plan(8 * MB), False),
        "gaps + o_proj + 8 MB of the others, side stream": (True, o_plan(8 * MB), True),
        "gaps + o_proj + 16 MB of the others": (True, o_plan(16 * MB), False),
        "gaps + o_proj and 16 MB of gate_up in the attention gap": (
            True, {"o_proj": [("o_proj", 64 * MB), ("gate_up_proj", 16 * MB)]}, False),
        "matmuls only + o_proj prefetched": (False, o_plan(0), False),
        "gaps only (spin alone)": None,
    }
    results = {"device": torch.cuda.get_device_name(), "copy_gb_s": copy_bw / 1e9,
               "weight_gb": weight_bytes / 1e9, "variants": {}}
    spin_total = sum(gaps.values()) * layers
    for label, v in variants.items():
        if v is None:
            us = graph_time(lambda: [torch.cuda._sleep(int(g * cyc)) for _ in range(layers) for g in gaps.values()])
            us *= 1e6
        else:
            spin, plan, on_side = v
            us = graph_time(lambda spin=spin, plan=plan, on_side=on_side: step(spin, plan, on_side)) * 1e6
        rate = weight_bytes / (us / 1e6) / 1e9
        print(f"{label:58s} {us:8.1f} us  ({rate:,.0f} GB/s of weights)")
        results["variants"][label] = us
    print(f"(spins add {spin_total:.0f} us if nothing overlaps)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
