"""Fused Triton ops against their torch twins, on random inputs (poisoned outputs, odd shapes, strided views)."""

from __future__ import annotations

import pytest
import torch

from ember.model.layers import RotaryEmbedding, rms_norm_ref, rotary_ref, silu_mul_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DTYPES = [torch.bfloat16, torch.float32]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def tol(dtype: torch.dtype) -> float:
    return 2e-2 if dtype == torch.bfloat16 else 1e-5


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
@pytest.mark.parametrize("t", [1, 37])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (32, 8, 128), (4, 4, 64)])
@pytest.mark.parametrize("path", ["kernel", "module"])
def test_rotary_in_place_on_fused_qkv_views(dtype, t, heads, kv_heads, head_dim, path):
    """`kernel`: rotary_ on q and on k, strided views of the qkv output; `module`: the model's path, where
    RotaryEmbedding rotates q and k (adjacent in each row) as one [t, heads + kv_heads, dim] view."""
    from ember.kernels.fused import rotary_

    rot = RotaryEmbedding(head_dim, 4096, 500000.0, {"factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 1024})
    rot.build_cache(torch.device("cuda"))
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(t, heads, head_dim), k.view(t, kv_heads, head_dim)
    pos = torch.randint(0, 4096, (t,), device="cuda")
    ref_q, ref_k = rotary_ref(pos, q.clone(), k.clone(), rot.cos_cache, rot.sin_cache)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    if path == "kernel":
        rotary_(q, pos, rot.cos_cache, rot.sin_cache)
        rotary_(k, pos, rot.cos_cache, rot.sin_cache)
    else:
        q, k = rot(pos, q, k)
    assert rel_err(q, ref_q) < tol(dtype) and rel_err(k, ref_k) < tol(dtype)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 1536), (5, 14336), (1000, 3000)])
def test_silu_mul(dtype, rows, inter):
    from ember.kernels.fused import silu_mul

    x = torch.randn(rows, 2 * inter, device="cuda", dtype=dtype) * 3
    got = silu_mul(x)
    assert got.shape == (rows, inter) and not got.isnan().any()
    assert rel_err(got, silu_mul_ref(x)) < tol(dtype)
