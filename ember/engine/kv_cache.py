"""Sizing and allocating the paged KV cache."""

from __future__ import annotations

import torch

from ember.config import KV_CACHE_DTYPES
from ember.model.config import ModelArchConfig

CPU_DEFAULT_KV_BYTES = 1 << 30
_FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


def kv_cache_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the cache stores K/V in. FP8 values are the activations cast with scale 1.0 (saturating at
    ±448); attention reads them back into the activation dtype."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {name!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
    dtype = _FP8.get(name, model_dtype)
    if dtype.itemsize == 1 and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):  # Triton converts to FP8 E4M3 with the instructions Ada and Hopper brought
            raise ValueError(f"kv_cache_dtype {name!r} needs a GPU with FP8 (compute capability 8.9 or newer); "
                             f"this one has {major}.{minor}")
    return dtype


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
