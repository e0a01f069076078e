"""Reference attention: gather each sequence's pages and call SDPA. Runs on CPU in CI; the oracle for kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.attention.backend import AttentionBackend, AttentionMetadata


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new K/V rows into their cache slots (negative slots are padding and skipped)."""
    kc = k_cache.view(-1, *k_cache.shape[2:])
    vc = v_cache.view(-1, *v_cache.shape[2:])
    if slot_mapping.numel() and bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    kc.index_copy_(0, slot_mapping, k.to(kc.dtype))
    vc.index_copy_(0, slot_mapping, v.to(vc.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A sequence's first `seq_len` cached rows: [seq_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    n_blocks = (seq_len + block_size - 1) // block_size
    pages = cache.index_select(0, block_table[:n_blocks].long())
    return pages.reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                        scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole cached context."""
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    start = 0
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
        if q_len == 0:
            continue
        qi = q[start:start + q_len].transpose(0, 1)  # [H, q_len, D]
        ki = gather_kv(k_cache, meta.block_tables[i], seq_len).transpose(0, 1).to(q.dtype)
        vi = gather_kv(v_cache, meta.block_tables[i], seq_len).transpose(0, 1).to(q.dtype)
        if group > 1:
            ki = ki.repeat_interleave(group, dim=0)
            vi = vi.repeat_interleave(group, dim=0)
        if q_len == 1:
            mask = None  # a single query at the end sees the whole context
        else:
            # Query j sits at absolute position seq_len - q_len + j and sees keys up to there.
            qpos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
            kpos = torch.arange(seq_len, device=q.device).unsqueeze(0)
            mask = kpos <= qpos
        oi = F.scaled_dot_product_attention(qi.unsqueeze(0), ki.unsqueeze(0), vi.unsqueeze(0), attn_mask=mask,
                                            scale=scale)
        out[start:start + q_len] = oi.squeeze(0).transpose(0, 1)
        start += q_len
    return out


class TorchAttention(AttentionBackend):
    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention_ref(q, k_cache, v_cache, meta, scale)
