"""The attention interface that the model calls once per layer.

The KV cache of one layer is a pair of tensors `[num_blocks, block_size, num_kv_heads, head_dim]`.
A batch is flat: the new tokens of every scheduled sequence, concatenated in sequence order. Sequence i owns
query rows `query_start_loc[i]:query_start_loc[i+1]`; these are its last `q_len` tokens, preceded by
`seq_lens[i] - q_len` tokens whose keys and values are already in the cache (a cached prefix, earlier chunks,
or earlier decode steps). Its KV lives in blocks `block_tables[i, :ceil(seq_lens[i] / block_size)]`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ember.model.layers import RotaryEmbedding


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: prefix sums of the per-sequence query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32: context length of each sequence after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # Host copies, for the reference path's per-sequence loop (no device sync needed to read them).
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # What a backend derives from this step's metadata once and reuses in every layer (metadata is not changed
    # after it is built).
    backend_cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(ABC):
    """Stores the new tokens' K/V into the paged cache, then attends causally over each sequence's context.

    With `rotary`, q and k are first rotated at `positions`; a backend may fuse that into its KV-cache store.
    """

    name: str

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        *,
        rotary: RotaryEmbedding | None = None,
        positions: torch.Tensor | None = None,  # [num_tokens], with rotary
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...

    def forward_from_hidden(
        self,
        x: torch.Tensor,  # [1, hidden]: the layer's input for one token, before the qkv product
        qkv_weight: torch.Tensor,  # [rows, hidden], the q heads' rows, then the k heads', then the v heads'
        qkv_bias: torch.Tensor | None,
        num_heads: int,
        num_kv_heads: int,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        *,
        rotary: RotaryEmbedding,
        positions: torch.Tensor,
        rms_eps: float | None = None,  # x is normalised inside the product (`Linear`'s rms_eps)
    ) -> torch.Tensor | None:
        """`forward` of the qkv product of one token x, where this backend fuses the product with what follows it
        (the caller has checked that the batch-1 GEMV serves the product); None where it does not (the caller
        then runs the product and `forward`)."""
        return None


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """`auto` picks Triton on CUDA and the torch reference elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from ember.attention.torch_ref import TorchAttention

        return TorchAttention()
    if name == "triton":
        from ember.attention.triton_backend import TritonAttention

        return TritonAttention()
    raise ValueError(f"unknown attention backend {name!r}; choose auto, torch or triton")
