"""FP8-weight matrix-vector product for batch-1 decode: `x @ (W * scale).T` for one row x in bf16/fp16 and W in
float8_e4m3fn with one fp32 scale per output row. Torch twin: `ember.model.fp8.dequantized_matmul`.

A batch-1 decode step reads every weight once, so its time is the weight bytes over the memory rate, and FP8
weights should halve it. cuBLASLt's row-wise scaled FP8 kernels are tiled for large M: at M = 1 on an H200 they
read the 8B model's projections at ~1.9 TB/s, and need an activation-quantization launch before each product,
which left the FP8 step slower than the bf16 one. Here each program streams a few whole rows of W (BLOCK_N rows,
all of K) and widens them in registers: the activation stays unquantized (weight-only FP8, as accurate as the
stored weights allow) and there is no extra launch. The products are multiplies and sums on the CUDA cores,
which keep up with the memory at one row of x (at two or more rows, or as a padded `tl.dot`, this kernel
streamed at half the rate or less, below cuBLASLt: bench/fp8_gemv.py).

The first weight tile is requested before waiting for the kernel before (programmatic dependent launch,
`ember/kernels/pdl.py`): weights are never written while a model serves, so that read is safe, and the ramp-up
of one product overlaps the kernels ahead of it. The first programs' rows can also be prefetched into L2 there,
as the 16-bit GEMV's option does (`ember/kernels/gemv.py`'s `PREFETCH_BYTES`, off by default; not measured with
FP8 weights).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels import gemv as bf16_gemv
from ember.kernels.gemv import GemvConfig, prefetch_programs, program_rows, row_dot_products
from ember.kernels.pdl import pdl_launch_args


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, N, K, stride_wn, prefetch_programs,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                     PREFETCH: tl.constexpr, NUM_THREADS: tl.constexpr, USE_PDL: tl.constexpr):
    # The 16-bit GEMV's loop; FP8 rows are `stride_wn` bytes.
    offs_n, offs_n_safe = program_rows(w_ptr, N, stride_wn, prefetch_programs, BLOCK_N, PREFETCH, NUM_THREADS)
    y, _, _ = row_dot_products(x_ptr, w_ptr + offs_n_safe[:, None] * stride_wn, K, BLOCK_K, EVEN_K, USE_PDL, False)
    y = y * tl.load(scale_ptr + offs_n_safe)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n_safe).to(tl.float32)
    tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def default_config(n: int, k: int) -> GemvConfig:
    """The launch shape of an (n, k) product: the fastest on an H200 for the 8B model's four projections
    (bench/fp8_gemv.py --sweep) was within a microsecond of this one for each."""
    return GemvConfig(block_n=4, block_k=min(1024, triton.next_power_of_2(k)), num_warps=4, num_stages=4)


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
             config: GemvConfig | None = None, prefetch_bytes: int | None = None) -> torch.Tensor:
    """`x @ (weight * scale[:, None]).T (+ bias)` for one row x `[1, k]`, weight `[n, k]` FP8 and `scale` `n`
    fp32 values; the result `[1, n]` has x's dtype. `config` and `prefetch_bytes` override the launch shape and
    the 16-bit GEMV's `PREFETCH_BYTES` (benchmarks)."""
    m, k = x.shape
    n = weight.shape[0]
    assert m == 1 and weight.shape[1] == k, (x.shape, weight.shape)
    assert x.stride(1) == 1 and weight.stride(1) == 1 and scale.numel() == n and scale.is_contiguous()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    config = config or default_config(n, k)
    if prefetch_bytes is None:
        prefetch_bytes = bf16_gemv.PREFETCH_BYTES
    programs = prefetch_programs(weight, config.block_n, prefetch_bytes)
    _fp8_gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, scale, bias if bias is not None else scale, out, n, k, weight.stride(0), programs,
        HAS_BIAS=bias is not None, BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0,
        PREFETCH=programs > 0, NUM_THREADS=32 * config.num_warps,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch_args(x.device))
    return out
