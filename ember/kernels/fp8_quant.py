"""Per-token FP8 quantization of activations in one pass: each program takes one row, finds its absolute maximum
and writes the row as float8_e4m3fn with its fp32 scale. Torch twin: `ember.model.fp8.quantize_rows`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels.pdl import pdl_launch_args, pdl_release, pdl_wait
from ember.model.fp8 import FP8_MAX, MIN_SCALE


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, n_cols, stride_x, stride_q, fp8_max, min_scale,
                          BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    pdl_release(USE_PDL)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / fp8_max, min_scale)
    q = tl.clamp(x / scale, -fp8_max, fp8_max)
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [M, K] float8_e4m3fn, scale [M, 1] fp32) with x ~= q * scale, row by row."""
    n_rows, n_cols = x.shape
    assert x.stride(1) == 1, "rows must be contiguous"
    q = torch.empty((n_rows, n_cols), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((n_rows, 1), dtype=torch.float32, device=x.device)
    if n_rows:
        block = triton.next_power_of_2(n_cols)
        _quantize_rows_kernel[(n_rows,)](x, q, scale, n_cols, x.stride(0), q.stride(0), FP8_MAX, MIN_SCALE,
                                         BLOCK=block, num_warps=8 if block >= 4096 else 4,
                                         **pdl_launch_args(x.device))
    return q, scale
