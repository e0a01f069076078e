"""Matrix-vector product for batch-1 decode with 16-bit weights: `x @ W.T (+ bias)` for one row x. Torch twin:
`torch.nn.functional.linear`.

A batch-1 step reads every weight once and runs ~5 short kernels a layer between its four products (RMSNorm,
rotary + KV store, attention, SiLU·mul) during which the memory is nearly idle. cuBLAS's products at M = 1 reach
~89 % of a device copy's rate on an H100 and cannot start before the kernel ahead has finished. This kernel
streams a few whole rows of W a program (a read-only stream: ~100 % of the copy rate, bench/gemv_decode.py) and
is launched early (programmatic dependent launch, `ember/kernels/pdl.py`): before it waits for the kernel ahead
it loads its first tile of W (weights are never written while a model serves, so that read is safe early), and
the short kernels release their dependents as they start (`pdl_small_kernel_args`), so its programs are resident
and reading while those kernels run.

The qkv product takes rotary and the KV store in its epilogue (`ember/kernels/gemv_qkv.py`). Options measured
and left off by default (docs/PERFORMANCE.md, eighth and ninth sessions): prefetching each weight's first
`PREFETCH_BYTES` into L2 (`cp.async.bulk.prefetch.L2`) before the wait (`EMBER_GEMV_PREFETCH_MB`; 8 MB gained
0.07 ms a step on an H100 with a narrower launch shape, lost 0.02 ms on an H200 with this one), SiLU·mul inside
the gate/up product (`gemv_silu_mul`, `EMBER_GEMV_SILU=1`: 0.03 ms slower on an H200), and RMSNorm inside the
products (`EMBER_GEMV_FOLD_NORMS=1`, x normalised and the residual added in the epilogue: 0.055 ms slower on an
H100).
`EMBER_GEMV=0` sends every product to cuBLAS (the baseline when measuring this kernel).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ember.kernels.pdl import hopper_or_later, pdl_launch_args, pdl_release, pdl_wait, use_pdl

ENABLED = os.environ.get("EMBER_GEMV", "1") != "0"
PREFETCH_BYTES = int(float(os.environ.get("EMBER_GEMV_PREFETCH_MB", "0")) * (1 << 20))
# A product after attention (o_proj) follows the longest gap of a layer (rotary + KV store + attention).
AFTER_ATTENTION_PREFETCH_BYTES = int(float(os.environ.get("EMBER_GEMV_PREFETCH_O_MB", "0")) * (1 << 20))
FUSE_SILU_MUL = os.environ.get("EMBER_GEMV_SILU", "0") == "1"
# `EMBER_GEMV_CONFIG=BLOCK_N,BLOCK_K,WARPS,STAGES`: one launch shape for every product instead of the default
# (to measure a card's own; `bench/gemv_decode.py --sweep` times them one product at a time).
CONFIG_OVERRIDE = os.environ.get("EMBER_GEMV_CONFIG", "")
# Rotary and the KV-cache store in the qkv product's epilogue (`ember.kernels.gemv_qkv`): 0.03 ms a step faster
# on an H100 (docs/PERFORMANCE.md, ninth session); `EMBER_GEMV_ROTARY_KV=0` runs them as their own kernel.
FUSE_ROTARY_KV = os.environ.get("EMBER_GEMV_ROTARY_KV", "1") != "0"
# `EMBER_GEMV_FOLD_NORMS=1`: a batch-1 step's per-layer RMSNorms run inside the products after them (0.055 ms a
# step slower on an H100, ninth session: off).
FOLD_NORMS = os.environ.get("EMBER_GEMV_FOLD_NORMS", "0") == "1"


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 3


@triton.jit
def prefetch_rows_l2(w_ptr, row0, rows, row_bytes, NUM_THREADS: tl.constexpr):
    """Ask L2 for `rows` contiguous rows of W from `row0`: one bulk request per thread (each thread holds one
    element of a NUM_THREADS-long tensor, so no request is issued twice)."""
    total = rows.to(tl.int64) * row_bytes
    chunk = (total + NUM_THREADS * 16 - 1) // (NUM_THREADS * 16) * 16  # the instruction takes 16-byte multiples
    lane = tl.arange(0, NUM_THREADS).to(tl.int64)
    start = lane * chunk
    size = tl.minimum(total - start, chunk).to(tl.int32)
    base = w_ptr.to(tl.pointer_type(tl.int8)) + row0.to(tl.int64) * row_bytes
    # Lanes past the end get size <= 0 and issue nothing.
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [base + start, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _weight_tile(w_rows, k, K, EVEN_K: tl.constexpr, EVICT_FIRST: tl.constexpr):
    if EVICT_FIRST:
        if EVEN_K:
            return tl.load(w_rows + k[None, :], eviction_policy="evict_first")
        return tl.load(w_rows + k[None, :], mask=(k < K)[None, :], other=0.0, eviction_policy="evict_first")
    if EVEN_K:
        return tl.load(w_rows + k[None, :])
    return tl.load(w_rows + k[None, :], mask=(k < K)[None, :], other=0.0)


@triton.jit
def program_rows(w_ptr, N, row_bytes, prefetch_programs, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr,
                 NUM_THREADS: tl.constexpr):
    """This program's BLOCK_N consecutive rows of W: (row indices, the same clamped to N, int64), with PREFETCH
    asked of L2 by the first `prefetch_programs` programs. Rows past N re-read row N-1 instead of being masked,
    so the weight loads stay unpredicated; their results are dropped."""
    pid = tl.program_id(0)
    row0 = pid * BLOCK_N
    if PREFETCH:
        if pid < prefetch_programs:
            prefetch_rows_l2(w_ptr, row0, tl.minimum(BLOCK_N, N - row0), row_bytes, NUM_THREADS)
    offs_n = row0 + tl.arange(0, BLOCK_N)
    return offs_n, tl.minimum(offs_n, N - 1).to(tl.int64)


@triton.jit
def row_dot_products(x_ptr, w_rows, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, USE_PDL: tl.constexpr,
                     EVICT_FIRST: tl.constexpr, SQUARES: tl.constexpr = False, bias_rows=None,
                     residual_rows=None, HAS_BIAS: tl.constexpr = False, HAS_RESIDUAL: tl.constexpr = False,
                     RELEASE_AT_WAIT: tl.constexpr = False):
    """Rows of W (`w_rows`: a pointer per row, `[BLOCK_N, 1]`) times x, in fp32, with the PDL wait inside: the first
    tile of W is loaded before it. Returns (the products, the sum of x's squares where SQUARES, else 0, the rows'
    bias (`bias_rows`, a pointer per row) plus residual (`residual_rows`) where asked, else 0). The bias, never
    written while serving, is read before the wait, the residual right after it: neither read waits behind the
    K loop. The next kernel is released after the K loop, or right after the wait where RELEASE_AT_WAIT (see
    `gemv_qkv.RELEASE_AT_WAIT`)."""
    offs_k = tl.arange(0, BLOCK_K)
    w = _weight_tile(w_rows, offs_k, K, EVEN_K, EVICT_FIRST)  # independent of the kernel ahead: loads during the wait
    addend = 0.0
    if HAS_BIAS:
        addend = tl.load(bias_rows).to(tl.float32)
    pdl_wait(USE_PDL)
    if RELEASE_AT_WAIT:
        pdl_release(USE_PDL)
    if HAS_RESIDUAL:
        addend += tl.load(residual_rows).to(tl.float32)
    # Partial products stay [BLOCK_N, BLOCK_K] and are summed over K once, after the loop: no shuffles per tile.
    x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
    acc = w.to(tl.float32) * x[None, :]
    squares = x * x
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        acc += _weight_tile(w_rows, k, K, EVEN_K, EVICT_FIRST).to(tl.float32) * x[None, :]
        if SQUARES:
            squares += x * x
    if not RELEASE_AT_WAIT:
        pdl_release(USE_PDL)
    sum_squares = 0.0
    if SQUARES:
        sum_squares = tl.sum(squares, axis=0)
    return tl.sum(acc, axis=1), sum_squares, addend


@triton.jit
def product_rows(x_ptr, w_ptr, rows, stride_wn, K, rms_eps, bias_ptr, residual_ptr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, USE_PDL: tl.constexpr, RMS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, RELEASE_AT_WAIT: tl.constexpr = False):
    """`rows` (int64) of W times x, RMS-normalised where RMS_NORM, plus their bias and residual where asked: fp32."""
    y, squares, addend = row_dot_products(x_ptr, w_ptr + rows[:, None] * stride_wn, K, BLOCK_K, EVEN_K, USE_PDL,
                                          True, RMS_NORM, bias_ptr + rows, residual_ptr + rows, HAS_BIAS,
                                          HAS_RESIDUAL, RELEASE_AT_WAIT)
    if RMS_NORM:
        # W·(x / rms(x)) = (W·x) / rms(x): the norm is a scalar per row of x, so every program applies it after
        # its own pass over x, with no extra read.
        y = y * tl.rsqrt(squares / K + rms_eps)
    if HAS_BIAS or HAS_RESIDUAL:
        y += addend
    return y


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, residual_ptr, out_ptr, N, K, stride_wn, row_bytes, prefetch_programs,
                 rms_eps, HAS_BIAS: tl.constexpr, RMS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 PREFETCH: tl.constexpr, NUM_THREADS: tl.constexpr, USE_PDL: tl.constexpr):
    offs_n, offs_n_safe = program_rows(w_ptr, N, row_bytes, prefetch_programs, BLOCK_N, PREFETCH, NUM_THREADS)
    y = product_rows(x_ptr, w_ptr, offs_n_safe, stride_wn, K, rms_eps, bias_ptr, residual_ptr, BLOCK_K, EVEN_K,
                     USE_PDL, RMS_NORM, HAS_BIAS, HAS_RESIDUAL)
    tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _gemv_silu_mul_kernel(x_ptr, w_ptr, out_ptr, INTER, K, stride_wn, row_bytes, prefetch_programs,
                          BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                          PREFETCH: tl.constexpr, NUM_THREADS: tl.constexpr, USE_PDL: tl.constexpr):
    # W is a fused gate/up weight [2 * INTER, K]: this program takes BLOCK_H gate rows and the up rows they pair with,
    # so SiLU(gate) * up is computed here and the step has no SiLU·mul launch.
    pid = tl.program_id(0)
    row0 = pid * BLOCK_H
    if PREFETCH:
        if pid < prefetch_programs:
            count = tl.minimum(BLOCK_H, INTER - row0)
            prefetch_rows_l2(w_ptr, row0, count, row_bytes, NUM_THREADS)
            prefetch_rows_l2(w_ptr, INTER + row0, count, row_bytes, NUM_THREADS)
    offs_h = row0 + tl.arange(0, BLOCK_H)
    # Rows in pairs: gate row h, then its up row INTER + h (h clamped to INTER - 1 as `program_rows` clamps).
    pair = tl.arange(0, 2 * BLOCK_H)
    rows = tl.minimum(row0 + pair // 2, INTER - 1).to(tl.int64) + (pair % 2) * INTER.to(tl.int64)
    y, _, _ = row_dot_products(x_ptr, w_ptr + rows[:, None] * stride_wn, K, BLOCK_K, EVEN_K, USE_PDL, True)
    gate, up = tl.split(tl.reshape(y, [BLOCK_H, 2]))
    # Rounded as the unfused path rounds: both products to the output dtype, then SiLU·mul's kernel arithmetic.
    dtype = out_ptr.dtype.element_ty
    g = gate.to(dtype).to(tl.float32)
    u = up.to(dtype)
    silu = (g / (1.0 + tl.exp(-g))).to(dtype)
    tl.store(out_ptr + offs_h, silu * u, mask=offs_h < INTER)


def default_config(n: int, k: int) -> GemvConfig:
    """The fastest launch shape for each of the 8B model's projections and its lm_head on an H100 (one CUDA graph
    of 32 products with distinct weights each; `bench/gemv_decode.py --sweep`)."""
    if CONFIG_OVERRIDE:
        block_n, block_k, warps, stages = (int(v) for v in CONFIG_OVERRIDE.split(","))
        return GemvConfig(block_n, min(block_k, triton.next_power_of_2(k)), warps, stages)
    return GemvConfig(block_n=2, block_k=min(2048, triton.next_power_of_2(k)), num_warps=8, num_stages=4)


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight)` takes this kernel: one 16-bit row on a Hopper-or-later GPU, W's rows unit-strided,
    distinct and 16-byte aligned (the kernel's loads are 16-byte vectors; other weights are cuBLAS's)."""
    if not ENABLED or not x.is_cuda or x.dim() != 2 or x.shape[0] != 1:
        return False
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype or weight.dim() != 2:
        return False
    if x.stride(1) != 1 or weight.stride(1) != 1 or (weight.stride(0) * weight.element_size()) % 16:
        return False
    if weight.shape[1] == 0 or weight.stride(0) < weight.shape[1]:
        return False
    if weight.data_ptr() % 16:
        return False
    return hopper_or_later(x.device)


def folds_norms(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model with `dtype` weights on `device` folds its RMSNorm weights into its products
    (`LlamaForCausalLM.fold_norms`): where this kernel serves its one-row products and can normalise x itself."""
    return FOLD_NORMS and ENABLED and dtype in (torch.bfloat16, torch.float16) and hopper_or_later(device)


def prefetch_programs(weight: torch.Tensor, rows_per_program: int, prefetch_bytes: int) -> int:
    """How many leading programs prefetch their rows of `weight` to cover `prefetch_bytes`: 0 (no prefetch) where
    the bulk prefetch cannot take the rows (16-byte aligned addresses and sizes) or where nothing runs ahead of
    the wait (without PDL a prefetch would only duplicate the product's own loads)."""
    row_bytes = weight.stride(0) * weight.element_size()
    if prefetch_bytes <= 0 or row_bytes % 16 or weight.data_ptr() % 16 or not use_pdl(weight.device):
        return 0
    return prefetch_bytes // (rows_per_program * row_bytes)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         rms_eps: float | None = None, residual: torch.Tensor | None = None,
         config: GemvConfig | None = None, prefetch_bytes: int | None = None,
         after_attention: bool = False) -> torch.Tensor:
    """`x @ weight.T (+ bias)` for x `[1, k]` and weight `[n, k]` of x's dtype (see `applies`); with `rms_eps`,
    x is RMS-normalised first (no weight: fold it into W), and `residual` `[1, n]` is added to the result
    (`ember.model.linear.linear_ref` is the twin). The bytes prefetched: `AFTER_ATTENTION_PREFETCH_BYTES` for a
    product `after_attention`, else `PREFETCH_BYTES`; `prefetch_bytes` and `config` override them and the launch
    shape (benchmarks)."""
    m, k = x.shape
    n = weight.shape[0]
    assert m == 1 and weight.shape[1] == k, (x.shape, weight.shape)
    if residual is not None:
        assert residual.shape == (1, n) and residual.stride(1) == 1, (residual.shape, n)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    config = config or default_config(n, k)
    if prefetch_bytes is None:
        prefetch_bytes = AFTER_ATTENTION_PREFETCH_BYTES if after_attention else PREFETCH_BYTES
    programs = prefetch_programs(weight, config.block_n, prefetch_bytes)
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, bias if bias is not None else weight, residual if residual is not None else weight, out, n, k,
        weight.stride(0), weight.stride(0) * weight.element_size(), programs, rms_eps or 0.0,
        HAS_BIAS=bias is not None, RMS_NORM=rms_eps is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0,
        PREFETCH=programs > 0, NUM_THREADS=32 * config.num_warps,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch_args(x.device))
    return out


def gemv_silu_mul(x: torch.Tensor, gate_up: torch.Tensor, *, config: GemvConfig | None = None,
                  prefetch_bytes: int | None = None) -> torch.Tensor:
    """SiLU(x @ gate.T) * (x @ up.T) for x `[1, k]` and the fused `gate_up` weight `[2 * i, k]` (gate rows first;
    see `applies`): `[1, i]`, in one launch. `config.block_n` counts the gate and up rows of a program."""
    m, k = x.shape
    inter = gate_up.shape[0] // 2
    assert m == 1 and gate_up.shape == (2 * inter, k), (x.shape, gate_up.shape)
    out = torch.empty(1, inter, dtype=x.dtype, device=x.device)
    config = config or default_config(2 * inter, k)
    block_h = max(1, config.block_n // 2)
    if prefetch_bytes is None:
        prefetch_bytes = PREFETCH_BYTES
    programs = prefetch_programs(gate_up, 2 * block_h, prefetch_bytes)
    _gemv_silu_mul_kernel[(triton.cdiv(inter, block_h),)](
        x, gate_up, out, inter, k, gate_up.stride(0), gate_up.stride(0) * gate_up.element_size(), programs,
        BLOCK_H=block_h, BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0,
        PREFETCH=programs > 0, NUM_THREADS=32 * config.num_warps,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch_args(x.device))
    return out
