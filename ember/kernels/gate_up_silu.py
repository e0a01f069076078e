"""The MLP's gate/up product with SiLU·mul in its epilogue, for steps of many tokens on Hopper. Torch twin:
`silu_mul_ref(F.linear(x, weight))` (`ember.model.layers`).

At thousands of tokens a step the gate/up product writes [rows, 2 * inter] and `silu_mul` reads it back to write
[rows, inter]: at the copy rate already (`bench/elementwise.py`), ~3.5 % of an offline step. Here a program
computes one [BLOCK_M, BLOCK_N] tile of both halves in one [BLOCK_M, 2 * BLOCK_N] product (Hopper's widest
wgmma at BLOCK_N 128): W, stored [gate; up], is seen as [2, inter, hidden], so one tensor-descriptor load takes
gate block j and up block j together. It writes SiLU(gate) * up, rounded as the unfused path rounds (each half
to the activation dtype, SiLU in fp32 of the rounded gate, rounded, times up). Measured against cuBLAS + silu_mul
by `bench/gate_up_silu.py`; fewer rows than `MIN_ROWS` stay with cuBLAS, which is faster there.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ember.kernels.pdl import hopper_or_later

# Off by default: on an H100 the offline run (1000 x 1024/128) took 33.84, 33.45 s with it against 34.17, 33.68 s
# without, alternating in two calls, inside the spread between runs (docs/PERFORMANCE.md, seventeenth session).
ENABLED = os.environ.get("EMBER_GATE_UP_SILU", "0") == "1"
MIN_ROWS = int(os.environ.get("EMBER_GATE_UP_SILU_MIN_ROWS", "4096"))
# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps): the fastest at 4,096 and 8,192 rows on an H200 (on an H100:
# 1,528 us at 4,096 rows against cuBLAS + silu_mul's 1,521, 2,977 us at 8,192 against 2,910: `bench/gate_up_silu.py`).
CONFIG = (128, 128, 64, 3, 8)
GROUP_M = 8


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid` in grouped order: GROUP_M row tiles sweep the column tiles
    together, so their W tiles come from L2."""
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit
def store_silu_mul(acc_g, acc_u, out_ptr, pid_m, pid_n, M, N, stride_om, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Write SiLU(gate) * up of one tile from its fp32 sums, rounded as the unfused path rounds: each half to the
    activation dtype, SiLU in fp32 of the rounded gate, rounded, times up."""
    dtype = out_ptr.dtype.element_ty
    g = acc_g.to(dtype).to(tl.float32)
    h = (g / (1.0 + tl.exp(-g))).to(dtype) * acc_u.to(dtype)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], h,
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _gate_up_silu_kernel(x_desc, w_desc, out_ptr, M, N, stride_om, K: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        # Rows past M and columns past N or K load as zeros (the descriptors' bounds).
        w = tl.reshape(w_desc.load([0, pid_n * BLOCK_N, k]), (2 * BLOCK_N, BLOCK_K))
        acc = tl.dot(x_desc.load([pid_m * BLOCK_M, k]), w.T, acc)
    acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
    store_silu_mul(acc_g, acc_u, out_ptr, pid_m, pid_n, M, N, stride_om, BLOCK_M, BLOCK_N)


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the MLP takes this kernel: on, enough rows, 16-bit contiguous operands on a Hopper-or-later GPU
    (tensor descriptors need 16-byte aligned rows)."""
    if not ENABLED or not x.is_cuda or x.dim() != 2 or x.shape[0] < MIN_ROWS:
        return False
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype or weight.dim() != 2:
        return False
    if not (x.is_contiguous() and weight.is_contiguous()) or (x.shape[1] * x.element_size()) % 16:
        return False
    return weight.shape[0] % 2 == 0 and weight.shape[1] == x.shape[1] and hopper_or_later(x.device)


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor,
                 config: tuple[int, int, int, int, int] = CONFIG) -> torch.Tensor:
    """SiLU(x @ gate.T) * (x @ up.T) for `weight` = [gate; up] ([2 * inter, hidden]): [rows, inter]."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = x.shape
    n = weight.shape[0] // 2
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm, bn, bk, stages, warps = config
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _gate_up_silu_kernel[grid](TensorDescriptor.from_tensor(x, [bm, bk]),
                               TensorDescriptor.from_tensor(weight.view(2, n, k), [2, bn, bk]), out, m, n,
                               out.stride(0), K=k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M,
                               num_stages=stages, num_warps=warps)
    return out
