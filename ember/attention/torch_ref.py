"""Reference attention: gather each sequence's pages and call SDPA. Runs on CPU in CI; the oracle for kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.attention.backend import AttentionBackend, AttentionMetadata


def _is_fp8(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point and t.element_size() == 1


def _rows(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`cache.index_select(0, index)`, through a uint8 view for FP8 (not every torch build selects FP8)."""
    if _is_fp8(cache):
        return cache.view(torch.uint8).index_select(0, index).view(cache.dtype)
    return cache.index_select(0, index)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, has_padding: bool = True) -> None:
    """Write new K/V rows into their cache slots (negative slots are padding and skipped; `has_padding=False`
    promises there are none)."""
    kc = k_cache.view(-1, *k_cache.shape[2:])
    vc = v_cache.view(-1, *v_cache.shape[2:])
    if slot_mapping.numel() and has_padding:
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    if _is_fp8(kc):
        # Saturate as the Triton store does (torch's own cast gives NaN beyond ±448 before 2.12), then store
        # through uint8 views: torch has no index_copy_ for FP8.
        top = torch.finfo(kc.dtype).max
        k, v = k.clamp(-top, top).to(kc.dtype), v.clamp(-top, top).to(vc.dtype)
        kc, vc, k, v = kc.view(torch.uint8), vc.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)
    else:
        k, v = k.to(kc.dtype), v.to(vc.dtype)
    kc.index_copy_(0, slot_mapping, k)
    vc.index_copy_(0, slot_mapping, v)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A sequence's first `seq_len` cached rows: [seq_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    n_blocks = (seq_len + block_size - 1) // block_size
    pages = _rows(cache, block_table[:n_blocks].long())
    return pages.reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole cached context.

    Decodes (one query each) are batched into one padded SDPA call; prefill chunks run one by one.
    """
    out = torch.empty_like(q)
    if any(n == 1 for n in meta.query_lens_cpu):
        _decode_batch(q, k_cache, v_cache, meta, scale, out)
    start = 0
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
        if q_len > 1:
            # A leading batch dimension keeps CPU SDPA on its flash kernel: 3-D GQA input with a mask falls back
            # to the math path, ~20x slower.
            qi = q[start:start + q_len].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
            ki = gather_kv(k_cache, meta.block_tables[i], seq_len).transpose(0, 1).unsqueeze(0).to(q.dtype)
            vi = gather_kv(v_cache, meta.block_tables[i], seq_len).transpose(0, 1).unsqueeze(0).to(q.dtype)
            if q_len == seq_len:  # no cached prefix: SDPA's top-left causal mask is the right one
                oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)
            else:
                # Query j sits at absolute position seq_len - q_len + j and sees keys up to there.
                qpos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
                kpos = torch.arange(seq_len, device=q.device).unsqueeze(0)
                oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=kpos <= qpos, scale=scale,
                                                    enable_gqa=True)
            out[start:start + q_len] = oi[0].transpose(0, 1)
        start += q_len
    return out


@dataclass
class _DecodeGather:
    """Where the decode rows of a step read their padded contexts from; the same for every layer."""

    rows: torch.Tensor | None  # [B] query rows of the decodes; None when every row is a decode
    slots: torch.Tensor  # [B * max_len] cache slots; padding points at the sequence's own first slot
    valid: torch.Tensor  # [B, max_len] bool


def _decode_gather(meta: AttentionMetadata, block_size: int) -> _DecodeGather:
    cached = meta.backend_cache.get("torch_decode")
    if cached is not None:
        return cached
    decodes = [i for i, n in enumerate(meta.query_lens_cpu) if n == 1]
    dev = meta.seq_lens.device
    idx = torch.tensor(decodes, device=dev)
    lens = meta.seq_lens[idx].long()
    max_len = max(meta.seq_lens_cpu[i] for i in decodes)
    pos = torch.arange(max_len, device=dev)
    valid = pos.unsqueeze(0) < lens.unsqueeze(1)  # [B, L]
    tables = meta.block_tables[idx].long()
    blocks = tables.gather(1, (pos // block_size).clamp(max=tables.shape[1] - 1).unsqueeze(0)
                           .expand(len(decodes), -1))
    # Padding reads a slot of the sequence's own context: finite data that the mask then ignores. (Any other
    # slot may hold NaN, and 0 * NaN would poison the weighted sum.)
    slots = torch.where(valid, blocks * block_size + pos % block_size, tables[:, :1] * block_size)
    # A batch of decodes only, in order: the query rows are all the rows, as they are.
    rows = None if len(decodes) == len(meta.query_lens_cpu) else meta.query_start_loc[idx].long()
    plan = _DecodeGather(rows, slots.flatten(), valid)
    meta.backend_cache["torch_decode"] = plan
    return plan


def _decode_batch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float, out: torch.Tensor) -> None:
    """All single-query sequences at once: their contexts gathered padded to the longest, the padding masked."""
    plan = _decode_gather(meta, k_cache.shape[1])
    b, max_len = plan.valid.shape
    kc = k_cache.reshape(-1, *k_cache.shape[2:])
    vc = v_cache.reshape(-1, *v_cache.shape[2:])
    k = _rows(kc, plan.slots).view(b, max_len, *kc.shape[1:]).transpose(1, 2)
    v = _rows(vc, plan.slots).view(b, max_len, *vc.shape[1:]).transpose(1, 2)
    qb = (q if plan.rows is None else q.index_select(0, plan.rows)).unsqueeze(2)  # [B, H, 1, D]
    o = F.scaled_dot_product_attention(qb, k.to(q.dtype), v.to(q.dtype), attn_mask=plan.valid[:, None, None, :],
                                       scale=scale, enable_gqa=True)
    if plan.rows is None:
        out.copy_(o.squeeze(2))
    else:
        out.index_copy_(0, plan.rows, o.squeeze(2))


class TorchAttention(AttentionBackend):
    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, *, rotary=None,
                positions=None) -> torch.Tensor:
        if rotary is not None:
            q, k = rotary(positions, q, k)
        padded = meta.backend_cache.get("torch_padded")
        if padded is None:  # once per step, not per layer
            padded = meta.backend_cache["torch_padded"] = bool((meta.slot_mapping < 0).any())
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping, padded)
        return paged_attention_ref(q, k_cache, v_cache, meta, scale)
