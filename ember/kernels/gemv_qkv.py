"""The batch-1 qkv product with rotary and the KV-cache store in its epilogue: one launch where the step had two
(the GEMV of `ember/kernels/gemv.py`, then `store_kv.rotary_store_kv`). Torch twin: `F.linear`, then
`RotaryEmbedding.forward` and `torch_ref.store_kv`.

Neox rotary mixes element j of a head with element j + head_dim/2, so each program takes exactly those two rows
of W (one pair of one head): it holds both results, rotates them and writes them where they go, q to the query
buffer the attention reads and k and v to their cache slot. The results are rounded to the activation dtype
before rotating and cos/sin go through it too, as in the unfused path, whose arithmetic this repeats. No L2
prefetch here (`gemv.PREFETCH_BYTES`, off by default, is ignored).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels.gemv import default_config, product_rows
from ember.kernels.pdl import ATTENTION_PREFETCH, pdl_launch_args

# Release the attention after this kernel as soon as each program's wait is over rather than after its K loop:
# attention's programs then launch while this kernel's last wave still streams W, and spend that time asking L2
# for their K/V (`paged_attention.PREFETCH_BEFORE_WAIT`). Safe for any kernel after it: a dependent reads nothing
# of this one's before its own wait.
RELEASE_AT_WAIT = ATTENTION_PREFETCH


@triton.jit
def _gemv_rotary_store_kv_kernel(
    x_ptr, w_ptr, bias_ptr, q_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, pos_ptr, cos_ptr, sin_ptr,
    K, stride_wn, rms_eps, num_heads, num_kv_heads,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_c,
    HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, RMS_NORM: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, USE_PDL: tl.constexpr, RELEASE_AT_WAIT: tl.constexpr,
):
    pid = tl.program_id(0)
    head = pid // HALF  # of the q heads, then the k heads, then the v heads, as the rows of W are
    j = pid % HALF
    pair = tl.arange(0, 2)
    rows = (head * 2 * HALF + j + pair * HALF).to(tl.int64)
    y = product_rows(x_ptr, w_ptr, rows, stride_wn, K, rms_eps, bias_ptr, bias_ptr, BLOCK_K, EVEN_K, USE_PDL,
                     RMS_NORM, HAS_BIAS, False, RELEASE_AT_WAIT)
    dtype = q_ptr.dtype.element_ty
    y = y.to(dtype).to(tl.float32)
    if head < num_heads + num_kv_heads:  # q and k rotate; v does not
        pos = tl.load(pos_ptr).to(tl.int64)
        c = tl.load(cos_ptr + pos * stride_c + j).to(dtype).to(tl.float32)
        s = tl.load(sin_ptr + pos * stride_c + j).to(dtype).to(tl.float32)
        # (x1, x2) -> (x1 c - x2 s, x2 c + x1 s): each element with its partner, the other element of the pair.
        first = tl.sum(tl.where(pair == 0, y, 0.0), axis=0)
        second = tl.sum(tl.where(pair == 0, 0.0, y), axis=0)
        partner = tl.where(pair == 0, second, first)
        y = y * c + tl.where(pair == 0, -partner, partner) * s
    out = y.to(dtype)
    if head < num_heads:
        tl.store(q_ptr + head * 2 * HALF + j + pair * HALF, out)
    else:
        # A negative slot is a padding token: nothing to store.
        slot = tl.load(slot_mapping_ptr).to(tl.int64)
        if slot >= 0:
            block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
            d = j + pair * HALF
            if head < num_heads + num_kv_heads:
                kv_head = head - num_heads
                tl.store(k_cache_ptr + block * stride_kcb + offset * stride_kcs + kv_head * stride_kch + d,
                         out.to(k_cache_ptr.dtype.element_ty))
            else:
                kv_head = head - num_heads - num_kv_heads
                tl.store(v_cache_ptr + block * stride_vcb + offset * stride_vcs + kv_head * stride_vch + d,
                         out.to(v_cache_ptr.dtype.element_ty))


def gemv_rotary_store_kv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int,
                         num_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                         positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor, *,
                         rms_eps: float | None = None) -> torch.Tensor:
    """q `[1, num_heads, head_dim]` of one token x `[1, k]` through the fused qkv `weight` (q, k, v heads' rows;
    `gemv.applies` must hold), rotated at `positions[0]`; k (rotated) and v go to cache slot `slot_mapping[0]`.
    With `rms_eps`, x is RMS-normalised first (a norm folded into W, as `gemv.gemv` takes it)."""
    head_dim = k_cache.shape[-1]
    half = head_dim // 2
    n, k = weight.shape
    assert x.shape == (1, k) and n == (num_heads + 2 * num_kv_heads) * head_dim, (x.shape, weight.shape)
    assert k_cache.shape[2] == num_kv_heads and k_cache.stride(-1) == 1
    assert v_cache.stride(-1) == 1 and cos_cache.stride(-1) == 1 and sin_cache.stride(0) == cos_cache.stride(0)
    q = torch.empty(1, num_heads, head_dim, dtype=x.dtype, device=x.device)
    config = default_config(n, k)
    _gemv_rotary_store_kv_kernel[((num_heads + 2 * num_kv_heads) * half,)](
        x, weight, bias if bias is not None else weight, q, k_cache, v_cache, slot_mapping, positions, cos_cache,
        sin_cache, k, weight.stride(0), rms_eps or 0.0, num_heads, num_kv_heads,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), cos_cache.stride(0),
        HALF=half, BLOCK_SIZE=k_cache.shape[1], HAS_BIAS=bias is not None, RMS_NORM=rms_eps is not None,
        BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0, RELEASE_AT_WAIT=RELEASE_AT_WAIT,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch_args(x.device))
    return q
