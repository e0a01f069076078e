"""FP8 quantization of activations. Per token, in one pass: each program takes one row, finds its absolute maximum
and writes the row as float8_e4m3fn with its fp32 scale (torch twin: `ember.model.fp8.quantize_rows`). Per
tensor, for decode batches: one scale for all rows, so that the matmul can take cuBLASLt's tensor-wise FP8
kernels, which read small batches' weights twice as fast as its row-wise ones."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels.pdl import pdl_launch_args, pdl_release, pdl_wait

FP8_MAX = 448.0
MIN_SCALE = 1e-12
# Per-tensor quantization reads every row's maximum in each program: batches up to this size.
MAX_TENSOR_ROWS = 64


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


@triton.jit
def _row_absmax_kernel(x_ptr, out_ptr, n_cols, stride_x, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    pdl_release(USE_PDL)
    tl.store(out_ptr + row, tl.max(tl.abs(x), axis=0))


@triton.jit
def _quantize_tensor_kernel(x_ptr, q_ptr, row_max_ptr, scale_ptr, n_rows, n_cols, stride_x, stride_q, fp8_max,
                            min_scale, BLOCK: tl.constexpr, ROWS: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    amax = tl.max(tl.load(row_max_ptr + rows, mask=rows < n_rows, other=0.0), axis=0)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    pdl_release(USE_PDL)
    scale = tl.maximum(amax / fp8_max, min_scale)
    q = tl.clamp(x / scale, -fp8_max, fp8_max)
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    if row == 0:
        tl.store(scale_ptr, scale)


def quantize_tensor_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [M, K] float8_e4m3fn, scale: one fp32 value) with x ~= q * scale: one scale for the whole batch, from
    its absolute maximum (each row's in a first launch, their maximum in the second). Torch twin:
    `ember.model.fp8.quantize_tensor`. For batches of at most `MAX_TENSOR_ROWS` rows."""
    n_rows, n_cols = x.shape
    assert x.stride(1) == 1, "rows must be contiguous"
    assert 0 < n_rows <= MAX_TENSOR_ROWS, n_rows
    q = torch.empty((n_rows, n_cols), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((), dtype=torch.float32, device=x.device)
    row_max = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(n_cols)
    warps = 8 if block >= 4096 else 4
    pdl = pdl_launch_args(x.device)
    _row_absmax_kernel[(n_rows,)](x, row_max, n_cols, x.stride(0), BLOCK=block, num_warps=warps, **pdl)
    _quantize_tensor_kernel[(n_rows,)](x, q, row_max, scale, n_rows, n_cols, x.stride(0), q.stride(0), FP8_MAX,
                                       MIN_SCALE, BLOCK=block, ROWS=triton.next_power_of_2(n_rows),
                                       num_warps=warps, **pdl)
    return q, scale
