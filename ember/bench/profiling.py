"""Kernel names from torch.profiler grouped into the families a step is discussed in (bench/profile_*.py)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch
from torch.autograd import DeviceType

# First match wins: the names are cuBLAS's (nvjet, cutlass, ...), torch's, and ember's Triton kernels.
FAMILIES = [("gemm", ("gemm", "nvjet", "gemv", "cutlass", "sm90_xmma", "splitk")),
            ("attention", ("attention", "split_kv")), ("rms_norm", ("rms_norm",)), ("rotary", ("rotary",)),
            ("silu_mul", ("silu",)), ("store_kv", ("store_kv",)),
            ("fp8_quant", ("quantize",)), ("embedding", ("embedding", "indexselect")),
            ("sampling", ("softmax", "topk", "sort", "argmax", "exponential", "max", "sum", "div")),
            ("copies", ("copy", "memcpy", "memset", "fill", "index", "gather", "cat"))]


def kernel_family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def kernel_times(prof) -> dict[str, tuple[float, int]]:  # noqa: ANN001 - a torch.profiler.profile
    """Device microseconds and calls of each kernel name in a finished profile. Host-side events that carry
    their kernels' device time too (graph launches, runtime calls, profiler steps) are left out, so nothing
    is counted twice."""
    out: dict[str, tuple[float, int]] = {}
    for evt in prof.key_averages():
        dev_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if dev_us <= 0 or evt.key.startswith(("cudaGraph", "cudaDevice", "cudaStream", "ProfilerStep")):
            continue
        out[evt.key] = (dev_us, evt.count)
    return out


def idle_gaps(events: list, top: int = 5) -> tuple[float, float, list[tuple[float, str, str]]]:  # noqa: ANN001
    """From a profile's events (`prof.events()`): the device's span and idle microseconds (no kernel or copy
    running, between the first start and the last end), and the `top` largest idle gaps as (us, the name
    before, the name after)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                   if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not spans:
        return 0.0, 0.0, []
    idle, gaps = 0.0, []
    end, last = spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        if start > end:
            idle += start - end
            gaps.append((start - end, last, name))
        if stop > end:
            end, last = stop, name
    gaps.sort(key=lambda g: -g[0])
    return end - spans[0][0], idle, gaps[:top]


def capture_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of one call of `fn`, run once first on a side stream (Triton compiles, the allocator settles)
    so that the capture records only launches."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def replay_us(fn: Callable[[], object]) -> float:
    """Microseconds per replay of a CUDA graph of one call of `fn`: the median of triton's `do_bench`, which
    flushes the L2 before each replay (so small inputs are read from HBM, as in a real step)."""
    from triton.testing import do_bench

    graph = capture_graph(fn)
    return float(do_bench(graph.replay, warmup=25, rep=100, return_mode="median")) * 1e3


def graph_time(fn: Callable[[], object], reps: int = 10) -> float:
    """Seconds per replay of a CUDA graph of one call of `fn` (median of `reps`, device events)."""
    g = capture_graph(fn)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


class GcPauses:
    """Records the garbage collector's runs while active (`with GcPauses() as pauses:`): (generation, microseconds)
    each. A collection stalls the host; one longer than a step's slack leaves the GPU idle."""

    def __init__(self) -> None:
        self.runs: list[tuple[int, float]] = []
        self._start = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.runs.append((int(info["generation"]), (time.perf_counter() - self._start) * 1e6))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, float | int]:
        us = [u for _, u in self.runs]
        return {"collections": len(us), "full_collections": sum(g == 2 for g, _ in self.runs),
                "total_us": round(sum(us), 1), "max_us": round(max(us, default=0.0), 1)}
