"""The GPU attention path: a Triton KV-store kernel, then Triton paged attention over the cache."""

from __future__ import annotations

import torch

from ember.attention.backend import AttentionBackend, AttentionMetadata
from ember.kernels.paged_attention import paged_attention
from ember.kernels.store_kv import store_kv


class TritonAttention(AttentionBackend):
    """Mixed prefill/decode batches in one launch; split-KV for decode batches too small to fill the GPU.

    `forward` never syncs with the host, so decode steps can be captured in a CUDA graph (the grid depends on
    the batch size and `meta.max_query_len` only).
    """

    name = "triton"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                               meta.max_query_len, scale)
