"""Fused Triton ops against their torch twins, on random inputs (poisoned outputs, odd shapes, strided views)."""

from __future__ import annotations

import os

import pytest
import torch

from ember.attention.torch_ref import store_kv as store_kv_ref
from ember.model.layers import RotaryEmbedding, rms_norm_ref, rotary_ref, silu_mul_ref

# With `TRITON_INTERPRET=1` the rotary/KV-store test also runs on the CPU (the others need CUDA).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET),
                                reason="needs CUDA (or TRITON_INTERPRET=1)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DTYPES = [torch.bfloat16, torch.float32]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def tol(dtype: torch.dtype) -> float:
    return 2e-2 if dtype == torch.bfloat16 else 1e-5


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 576), (7, 4096), (300, 1000), (8192, 4096)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, rows, cols, with_residual):
    from ember.kernels.fused import rms_norm

    x = torch.randn(rows, cols, device="cuda", dtype=dtype)
    w = torch.rand(cols, device="cuda", dtype=dtype) + 0.5
    res = torch.randn_like(x) if with_residual else None
    got = rms_norm(x, w, 1e-5, res)
    ref = rms_norm_ref(x, w, 1e-5, res)
    if with_residual:
        assert rel_err(got[0], ref[0]) < tol(dtype) and torch.equal(got[1], ref[1])
    else:
        assert not got.isnan().any() and rel_err(got, ref) < tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 37, 300])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (32, 8, 128), (4, 4, 64)])
def test_rotary_store_kv_matches_torch(dtype, t, heads, kv_heads, head_dim):
    """One launch rotates q and k (strided views of the qkv output) in place and stores k and v in the cache,
    as `rotary_ref` then `torch_ref.store_kv` do. Unwritten slots hold NaN and must stay NaN."""
    from ember.kernels.store_kv import rotary_store_kv

    gen = torch.Generator().manual_seed(t * 100 + heads)
    rot = RotaryEmbedding(head_dim, 4096, 500000.0, {"factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 1024})
    rot.build_cache(DEVICE)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (x.view(t, -1, head_dim) for x in (q, k, v))
    pos = torch.randint(0, 4096, (t,), generator=gen).to(DEVICE)
    block_size, num_blocks = 16, t // 16 + 3
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:t]
    slots[::7] = -1  # padding tokens
    slots = slots.to(DEVICE)
    kc = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), device=DEVICE, dtype=dtype)
    vc = kc.clone()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref_q, ref_k = rotary_ref(pos, q.clone(), k.clone(), rot.cos_cache, rot.sin_cache)
    store_kv_ref(ref_k, v, kc_ref, vc_ref, slots)
    v_before = v.clone()

    rotary_store_kv(q, k, v, kc, vc, slots, pos, rot.cos_cache, rot.sin_cache)
    assert rel_err(q, ref_q) < tol(dtype) and rel_err(k, ref_k) < tol(dtype)
    assert torch.equal(v, v_before)
    assert torch.equal(kc.isnan(), kc_ref.isnan()) and rel_err(kc.nan_to_num(), kc_ref.nan_to_num()) < tol(dtype)
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0, equal_nan=True)
    # The cache holds exactly the k rows rotated in place.
    keep = slots >= 0
    assert torch.equal(kc.view(-1, kv_heads, head_dim)[slots[keep]], k[keep])


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 1536), (5, 14336), (1000, 3000)])
def test_silu_mul(dtype, rows, inter):
    from ember.kernels.fused import silu_mul

    x = torch.randn(rows, 2 * inter, device="cuda", dtype=dtype) * 3
    got = silu_mul(x)
    assert got.shape == (rows, inter) and not got.isnan().any()
    assert rel_err(got, silu_mul_ref(x)) < tol(dtype)


# CUDA only: the interpreter's float8 conversion does not round to nearest (124.4 became 64, not 128).
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 576), (5, 960), (33, 4096), (3, 14336)])
def test_quantize_rows_fp8_matches_torch(dtype, rows, cols):
    from ember.kernels.fp8_quant import quantize_rows_fp8
    from ember.model.fp8 import quantize_rows

    g = torch.Generator(device="cpu").manual_seed(rows * cols)
    x = (torch.randn(rows, cols, generator=g) * torch.logspace(-3, 2, rows)[:, None]).to(dtype)
    x[0, :] = 0  # an all-zero row: a finite scale, zeros out
    x = x.to(DEVICE)
    q, scale = quantize_rows_fp8(x)
    q_ref, scale_ref = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (rows, 1)
    assert torch.allclose(scale, scale_ref, rtol=1e-6, atol=0)
    # The same rounding, up to a last-bit difference of the division on either side of a tie.
    diff = (q.float() - q_ref.float()).abs() / q_ref.float().abs().clamp_min(2 ** -6)
    assert (diff > 0.13).sum() == 0 and (diff > 0).float().mean() < 1e-3
    assert torch.isfinite(q.float()).all() and not q[0].float().any()

