"""Sizing and allocating the paged KV cache."""

from __future__ import annotations

import torch

from ember.model.config import ModelArchConfig

CPU_DEFAULT_KV_BYTES = 1 << 30


def bytes_per_block(arch: ModelArchConfig, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
    """K and V for one block of tokens across all layers (of this rank's KV heads, under tensor parallelism)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * arch.num_hidden_layers * block_size * (arch.num_key_value_heads // tp_size) * arch.head_dim * elem


def allocate_kv_cache(arch: ModelArchConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device, tp_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, arch.num_key_value_heads // tp_size, arch.head_dim)
    # One allocation per layer for K and V together keeps the number of tensors (and graph inputs) small.
    # On the CPU, `empty` lets pages be touched lazily as blocks come into use (zeroing a GiB takes seconds
    # here); every slot is written before it is read.
    alloc = torch.zeros if device.type == "cuda" else torch.empty
    caches = []
    for _ in range(arch.num_hidden_layers):
        kv = alloc((2, *shape), dtype=dtype, device=device)
        caches.append((kv[0], kv[1]))
    return caches
