"""Fused small ops of the Llama block: residual add + RMSNorm, SiLU * up.

At batch 1 a decode step is ~10 small elementwise launches per layer beside the matmuls; each costs a few
microseconds even inside a CUDA graph, and in prefill each is a full pass over a [tokens, hidden] tensor.
One kernel per op reads its inputs once. Torch twins: `RMSNorm.forward`, `GatedMLP.forward` in
`ember/model/layers.py`. (Rotary embedding is fused into the KV-cache store: `ember/kernels/store_kv.py`.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels.pdl import pdl_release_early, pdl_release_late, pdl_small_kernel_args, pdl_wait


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_rows, n_cols, stride_x, stride_r, stride_o,
                     stride_ro, eps, HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                     USE_PDL: tl.constexpr, RELEASE_EARLY: tl.constexpr):
    pdl_release_early(USE_PDL, RELEASE_EARLY)
    pdl_wait(USE_PDL)
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    x = tl.load(x_ptr + rows * stride_x + cols, mask=mask, other=0.0)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0)
    if HAS_RES:
        # The sum is rounded to the activation dtype, as the reference adds in that dtype.
        x = x + tl.load(res_ptr + rows * stride_r + cols, mask=mask, other=0.0)
    pdl_release_late(USE_PDL, RELEASE_EARLY)
    if HAS_RES:
        tl.store(res_out_ptr + rows * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=1) / n_cols
    h = (xf * tl.rsqrt(var + eps)[:, None]).to(x.dtype)
    tl.store(out_ptr + rows * stride_o + cols, w * h, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
             rows_per_program: int | None = None, num_warps: int | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x (after adding residual, which is then returned as the new residual). The keywords override
    the launch configuration (`bench/elementwise.py` sweeps them)."""
    n_rows, n_cols = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    res = residual if residual is not None else x
    block = triton.next_power_of_2(n_cols)
    rows = rows_per_program or 1
    warps = num_warps or (8 if block >= 4096 else 4)
    programs = triton.cdiv(n_rows, rows)
    if n_rows:
        _rms_norm_kernel[(programs,)](x, res, weight, out, res_out, n_rows, n_cols, x.stride(0), res.stride(0),
                                      out.stride(0), res_out.stride(0), eps, HAS_RES=residual is not None,
                                      ROWS=rows, BLOCK=block, num_warps=warps,
                                      **pdl_small_kernel_args(x.device, programs))
    return out if residual is None else (out, res_out)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
                     RELEASE_EARLY: tl.constexpr):
    pdl_release_early(USE_PDL, RELEASE_EARLY)
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    silu = (g / (1.0 + tl.exp(-g))).to(u.dtype)
    pdl_release_late(USE_PDL, RELEASE_EARLY)
    tl.store(out_ptr + row * stride_o + cols, silu * u, mask=mask)


def silu_mul(gate_up: torch.Tensor, *, block: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """SiLU(first half) * second half of each row: [tokens, 2 * inter] -> [tokens, inter]. The keywords override
    the launch configuration (`bench/elementwise.py` sweeps them)."""
    n_rows, width = gate_up.shape
    inter = width // 2
    out = torch.empty(n_rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = block or 1024
    programs = n_rows * triton.cdiv(inter, block)
    if n_rows:
        _silu_mul_kernel[(n_rows, triton.cdiv(inter, block))](gate_up, out, inter, gate_up.stride(0),
                                                              out.stride(0), BLOCK=block, num_warps=num_warps or 4,
                                                              **pdl_small_kernel_args(out.device, programs))
    return out
