"""Kernel names from torch.profiler grouped into the families a step is discussed in (bench/profile_*.py)."""

from __future__ import annotations

# First match wins: the names are cuBLAS's (nvjet, cutlass, ...), torch's, and ember's Triton kernels.
FAMILIES = [("gemm", ("gemm", "nvjet", "gemv", "cutlass", "sm90_xmma", "splitk")),
            ("attention", ("attention", "split_kv")), ("rms_norm", ("rms_norm",)), ("rotary", ("rotary",)),
            ("silu_mul", ("silu",)), ("store_kv", ("store_kv",)), ("embedding", ("embedding", "indexselect")),
            ("sampling", ("softmax", "topk", "sort", "argmax", "exponential", "max", "sum", "div")),
            ("copies", ("copy", "memcpy", "memset", "fill", "index", "gather", "cat"))]


def kernel_family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"
