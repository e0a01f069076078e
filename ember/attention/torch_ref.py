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


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole cached context.

    Decodes (one query each) are batched into one padded SDPA call; prefill chunks run one by one.
    """
    out = torch.empty_like(q)
    decodes = [i for i, n in enumerate(meta.query_lens_cpu) if n == 1]
    if decodes:
        _decode_batch(q, k_cache, v_cache, meta, scale, decodes, out)
    start = 0
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
        if q_len > 1:
            qi = q[start:start + q_len].transpose(0, 1)  # [H, q_len, D]
            ki = gather_kv(k_cache, meta.block_tables[i], seq_len).transpose(0, 1).to(q.dtype)
            vi = gather_kv(v_cache, meta.block_tables[i], seq_len).transpose(0, 1).to(q.dtype)
            # Query j sits at absolute position seq_len - q_len + j and sees keys up to there.
            qpos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
            kpos = torch.arange(seq_len, device=q.device).unsqueeze(0)
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=kpos <= qpos, scale=scale, enable_gqa=True)
            out[start:start + q_len] = oi.transpose(0, 1)
        start += q_len
    return out


def _decode_batch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float, decodes: list[int], out: torch.Tensor) -> None:
    """All single-query sequences at once: gather their contexts padded to the longest, mask the padding."""
    bs = k_cache.shape[1]
    dev = q.device
    idx = torch.tensor(decodes, device=dev)
    rows = meta.query_start_loc[idx].long()
    lens = meta.seq_lens[idx].long()
    max_len = max(meta.seq_lens_cpu[i] for i in decodes)
    pos = torch.arange(max_len, device=dev)
    valid = pos.unsqueeze(0) < lens.unsqueeze(1)  # [B, L]
    blocks = meta.block_tables[idx].long().gather(1, (pos // bs).clamp(max=meta.block_tables.shape[1] - 1)
                                                  .unsqueeze(0).expand(len(decodes), -1))
    slots = torch.where(valid, blocks * bs + pos % bs, 0)
    kc = k_cache.reshape(-1, *k_cache.shape[2:])
    vc = v_cache.reshape(-1, *v_cache.shape[2:])
    k = kc.index_select(0, slots.flatten()).view(len(decodes), max_len, *kc.shape[1:]).transpose(1, 2)
    v = vc.index_select(0, slots.flatten()).view(len(decodes), max_len, *vc.shape[1:]).transpose(1, 2)
    # Padding rows were read from slot 0, which may hold anything (even NaN, and 0 * NaN poisons the sum).
    pad = ~valid[:, None, :, None]
    k, v = k.masked_fill(pad, 0), v.masked_fill(pad, 0)
    qb = q.index_select(0, rows).unsqueeze(2)  # [B, H, 1, D]
    o = F.scaled_dot_product_attention(qb, k.to(q.dtype), v.to(q.dtype), attn_mask=valid[:, None, None, :],
                                       scale=scale, enable_gqa=True)
    out.index_copy_(0, rows, o.squeeze(2))


class TorchAttention(AttentionBackend):
    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention_ref(q, k_cache, v_cache, meta, scale)
