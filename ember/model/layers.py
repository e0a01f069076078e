"""Building blocks of the Llama family: RMSNorm, rotary embedding (incl. llama3 scaling), gated MLP."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ember.distributed.parallel import TensorParallel
from ember.model.linear import Linear, rms_normalise


def _fused_ops(x: torch.Tensor):  # noqa: ANN202
    """The Triton kernels for CUDA tensors; None elsewhere (the torch code below is their reference)."""
    if not x.is_cuda:
        return None
    from ember.kernels import fused

    return fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """With `residual`, adds it first and returns (normed, new residual): the pre-norm block's pattern."""
        fused = _fused_ops(x)
        if fused is not None:
            return fused.rms_norm(x, self.weight, self.eps, residual)
        return rms_norm_ref(x, self.weight, self.eps, residual)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
        residual = x
    out = weight * rms_normalise(x, eps)
    return out if residual is None else (out, residual)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency remapping: long wavelengths slowed by `factor`, short ones kept, smooth between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) rotary embedding with a precomputed cos/sin table indexed by position."""

    def __init__(self, head_dim: int, max_positions: int, base: float,
                 scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.base, self.scaling = head_dim, max_positions, base, scaling
        self.build_cache(None)

    def build_cache(self, device: torch.device | None) -> None:
        """(Re)compute the fp32 cos/sin table on `device` (models are built on the meta device first)."""
        dim = self.head_dim
        if torch.device(device if device is not None else torch.get_default_device()).type == "meta":
            # Shapes only. (Computing on meta runs torch's Python references, whose first call imports sympy:
            # ~2 s of a cold start.)
            shape = (self.max_positions, 2 * len(range(0, dim, 2)))
            self.register_buffer("cos_cache", torch.empty(shape, device="meta"), persistent=False)
            self.register_buffer("sin_cache", torch.empty(shape, device="meta"), persistent=False)
            return
        inv_freq = 1.0 / (self.base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
        if self.scaling is not None:
            inv_freq = _llama3_inv_freq(inv_freq, self.scaling)
        t = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        emb = torch.cat([torch.outer(t, inv_freq)] * 2, dim=-1)
        self.register_buffer("cos_cache", emb.cos(), persistent=False)
        self.register_buffer("sin_cache", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, D], k: [T, KVH, D]; positions: [T]. The torch path; the Triton attention backend rotates in
        place instead, fused with its KV-cache store (`ember.kernels.store_kv.rotary_store_kv`)."""
        # q and k usually sit side by side in each row of the fused qkv output: rotating them as one tensor
        # halves the op calls, with the same arithmetic per element.
        qk = _joined_heads(q, k)
        if qk is None:
            return rotary_ref(positions, q, k, self.cos_cache, self.sin_cache)
        out = _apply_rotary(qk, self.cos_cache[positions].unsqueeze(1), self.sin_cache[positions].unsqueeze(1))
        return out[:, :q.shape[1]], out[:, q.shape[1]:]


def _joined_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q and k as one [T, H + KVH, D] view when k's heads follow q's in memory with the same strides."""
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.stride()[1:] != k.stride()[1:]:
        return None
    if q.shape[0] > 1 and q.stride(0) != k.stride(0):  # (a size-1 dimension's stride is arbitrary)
        return None
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        return None
    if q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr():
        return None
    if k.storage_offset() != q.storage_offset() + q.shape[1] * q.stride(1):
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride())


def rotary_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
               sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos_cache[positions].unsqueeze(1)
    sin = sin_cache[positions].unsqueeze(1)
    return _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    # cos/sin are fp32; cast them to the activation dtype as the reference does.
    cos, sin = cos.to(dtype), sin.to(dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class GatedMLP(nn.Module):
    """SiLU(gate) * up, then down; gate and up share one matmul. With tensor parallelism `intermediate` is this
    rank's slice, and down's partial sums are added up over the ranks."""

    def __init__(self, hidden: int, intermediate: int, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.tp = tp or TensorParallel()
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor, *, rms_eps: float | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """`rms_eps`: normalise x inside gate_up_proj (the norm's weight folded into it); `residual`: added inside
        down_proj (one rank only)."""
        assert residual is None or not self.tp.enabled
        # The SiLU·mul GEMV option does not normalise, so folded norms go without it.
        if rms_eps is not None:
            h = silu_mul(self.gate_up_proj(x, rms_eps=rms_eps))
        else:
            h = self._fused_gate_up(x)
            if h is None:
                h = silu_mul(self.gate_up_proj(x))
        return self.tp.all_reduce(self.down_proj(h, residual=residual))

    def _fused_gate_up(self, x: torch.Tensor) -> torch.Tensor | None:
        """SiLU·mul inside the product: the batch-1 GEMV where `Linear` would take that kernel
        (`ember.kernels.gemv`), the epilogue of a Triton GEMM for steps of many tokens
        (`ember.kernels.gate_up_silu`); None where neither applies."""
        proj = self.gate_up_proj
        if not isinstance(proj, Linear) or proj.bias is not None:  # an Fp8Linear, or a biased projection
            return None
        if x.is_cuda and x.shape[0] > 1:
            from ember.kernels import gate_up_silu

            return gate_up_silu.gate_up_silu(x, proj.weight) if gate_up_silu.applies(x, proj.weight) else None
        gemv = proj.gemv_kernels(x)
        return gemv.gemv_silu_mul(x, proj.weight) if gemv is not None and gemv.FUSE_SILU_MUL else None


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(first half) * second half of each row (a Triton kernel on CUDA)."""
    fused = _fused_ops(gate_up)
    return fused.silu_mul(gate_up) if fused is not None else silu_mul_ref(gate_up)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
