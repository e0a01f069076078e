"""The GPU attention path: a Triton KV-store kernel (rotating q and k on the way), then Triton paged attention
over the cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ember.attention.backend import AttentionBackend, AttentionMetadata
from ember.kernels.paged_attention import paged_attention
from ember.kernels.store_kv import rotary_store_kv, store_kv

if TYPE_CHECKING:
    from ember.model.layers import RotaryEmbedding


class TritonAttention(AttentionBackend):
    """Mixed prefill/decode batches in one launch; split-KV for decode batches too small to fill the GPU.

    `forward` never syncs with the host, so decode steps can be captured in a CUDA graph (the grid depends on
    the batch size and `meta.max_query_len` only).
    """

    name = "triton"

    def __init__(self) -> None:
        self._counters: dict[torch.device, torch.Tensor] = {}

    def _split_counters(self, device: torch.device) -> torch.Tensor | None:
        """The split-KV kernel's arrival counters on `device`: zeroed once, left zero by every launch.

        Never replaced, since captured decode graphs hold its address. 64k entries cover any batch that takes
        the split path (fewer (sequence, KV head) programs than SMs); larger ones fall back to a zeroed buffer
        per call.
        """
        counters = self._counters.get(device)
        if counters is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                # A memset recorded in a graph runs only at replay: let this launch zero its own buffer.
                return None
            counters = self._counters[device] = torch.zeros(1 << 16, dtype=torch.int32, device=device)
        return counters

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, *,
                rotary: RotaryEmbedding | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        if rotary is None:
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        else:
            # One launch instead of a rotary and a store kernel: at batch 1 each costs microseconds of
            # launch latency for a few KB of work.
            rotary_store_kv(q, k, v, k_cache, v_cache, meta.slot_mapping, positions, rotary.cos_cache,
                            rotary.sin_cache)
        return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                               meta.max_query_len, scale, counters=self._split_counters(q.device))

    def forward_from_hidden(self, x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None,
                            num_heads: int, num_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float, *, rotary: RotaryEmbedding, positions: torch.Tensor,
                            rms_eps: float | None = None) -> torch.Tensor | None:
        """Rotary and the KV store in the qkv product's epilogue (`ember.kernels.gemv_qkv`), then attention: one
        launch fewer than the product and `forward`."""
        from ember.kernels.gemv_qkv import gemv_rotary_store_kv

        q = gemv_rotary_store_kv(x, qkv_weight, qkv_bias, num_heads, num_kv_heads, k_cache, v_cache,
                                 meta.slot_mapping, positions, rotary.cos_cache, rotary.sin_cache, rms_eps=rms_eps)
        return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                               meta.max_query_len, scale, counters=self._split_counters(q.device))
