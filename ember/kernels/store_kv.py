"""Write the new tokens' K/V rows into their paged-cache slots, rotating q and k on the way if asked.

Torch twins: `torch_ref.store_kv`, preceded by `RotaryEmbedding.forward` for `rotary_store_kv`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels.pdl import pdl_release_early, pdl_release_late, pdl_small_kernel_args, pdl_wait


@triton.jit
def _rotate_half(x1, x2, c, s):
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    return (x1f * c - x2f * s).to(x1.dtype), (x2f * c + x1f * s).to(x1.dtype)


@triton.jit
def _store_kv_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, pos_ptr, cos_ptr, sin_ptr,
    group,  # query heads per KV head
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_c,
    BLOCK_SIZE: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, GROUP_P: tl.constexpr,
    ROTARY: tl.constexpr, USE_PDL: tl.constexpr, RELEASE_EARLY: tl.constexpr,
):
    # Program (token, KV head): that head's k and v rows and, with ROTARY, its group of query heads. Each row is
    # handled as its two halves, the pairs that neox rotary mixes.
    pdl_release_early(USE_PDL, RELEASE_EARLY)
    pdl_wait(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    d = tl.arange(0, HALF_P)
    d_mask = d < HALF
    k_row = k_ptr + token * stride_kt + kv_head * stride_kh + d
    k1 = tl.load(k_row, mask=d_mask)
    k2 = tl.load(k_row + HALF, mask=d_mask)
    if ROTARY:
        pos = tl.load(pos_ptr + token).to(tl.int64)
        # cos/sin go through the activation dtype first, as in the reference.
        c = tl.load(cos_ptr + pos * stride_c + d, mask=d_mask).to(k1.dtype).to(tl.float32)
        s = tl.load(sin_ptr + pos * stride_c + d, mask=d_mask).to(k1.dtype).to(tl.float32)
        g = tl.arange(0, GROUP_P)
        q_mask = (g[:, None] < group) & d_mask[None, :]
        q_rows = q_ptr + token * stride_qt + (kv_head * group + g[:, None]) * stride_qh + d[None, :]
        q1, q2 = _rotate_half(tl.load(q_rows, mask=q_mask), tl.load(q_rows + HALF, mask=q_mask), c[None, :],
                              s[None, :])
        tl.store(q_rows, q1, mask=q_mask)
        tl.store(q_rows + HALF, q2, mask=q_mask)
        k1, k2 = _rotate_half(k1, k2, c, s)
        tl.store(k_row, k1, mask=d_mask)
        tl.store(k_row + HALF, k2, mask=d_mask)
    v_row = v_ptr + token * stride_vt + kv_head * stride_vh + d
    v1 = tl.load(v_row, mask=d_mask)
    v2 = tl.load(v_row + HALF, mask=d_mask)
    pdl_release_late(USE_PDL, RELEASE_EARLY)
    # A negative slot is a padding token (e.g. a CUDA-graph batch padded to its captured size): nothing to store.
    store_mask = d_mask & (slot >= 0)
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    kc = k_cache_ptr + block * stride_kcb + offset * stride_kcs + kv_head * stride_kch + d
    vc = v_cache_ptr + block * stride_vcb + offset * stride_vcs + kv_head * stride_vch + d
    tl.store(kc, k1.to(k_cache_ptr.dtype.element_ty), mask=store_mask)
    tl.store(kc + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=store_mask)
    tl.store(vc, v1.to(v_cache_ptr.dtype.element_ty), mask=store_mask)
    tl.store(vc + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=store_mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Copy `k`/`v` `[num_tokens, num_kv_heads, head_dim]` into cache slots; negative slots are skipped."""
    _launch(None, k, v, k_cache, v_cache, slot_mapping, None, None, None)


def rotary_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor,
                    cos_cache: torch.Tensor, sin_cache: torch.Tensor) -> None:
    """Rotate `q` `[num_tokens, num_heads, head_dim]` and `k` in place (neox rotate-half at `positions`), then
    store `k` and `v` as `store_kv` does: one launch."""
    _launch(q, k, v, k_cache, v_cache, slot_mapping, positions, cos_cache, sin_cache)


def _launch(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
            v_cache: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor | None,
            cos_cache: torch.Tensor | None, sin_cache: torch.Tensor | None) -> None:
    """No host sync, so it can run inside a captured CUDA graph."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    rotary = q is not None
    if not rotary:  # the kernel does not read them: any tensor will do
        q, positions, cos_cache, sin_cache = k, slot_mapping, k, k
    # Rows are addressed with unit stride along the head dim; q/k/v split out of a fused projection keep it.
    for x in (q, k, v, k_cache, v_cache, cos_cache, sin_cache):
        assert x.stride(-1) == 1, "rows must be contiguous"
    assert sin_cache.stride(0) == cos_cache.stride(0), "cos and sin tables are addressed with one row stride"
    assert head_dim % 2 == 0
    group = q.shape[1] // num_kv_heads
    group_p = triton.next_power_of_2(group) if rotary else 1
    half = head_dim // 2
    # Programs of (token, KV head): at batch 1 a Llama-8B layer still gets 8 programs on 8 SMs instead of one
    # program doing all 48 rows, and a prefill chunk gets many small ones. A program moves a few KB, which one
    # warp keeps in flight.
    _store_kv_kernel[(num_tokens, num_kv_heads)](
        q, k, v, k_cache, v_cache, slot_mapping, positions, cos_cache, sin_cache,
        group,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), cos_cache.stride(0),
        BLOCK_SIZE=k_cache.shape[1], HALF=half, HALF_P=triton.next_power_of_2(half), GROUP_P=group_p,
        ROTARY=rotary, num_warps=min(4, max(1, group_p * triton.next_power_of_2(half) // 256)),
        **pdl_small_kernel_args(k.device, num_tokens * num_kv_heads),
    )
