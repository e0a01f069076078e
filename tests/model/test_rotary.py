"""Rotary embedding: q and k taken from one fused qkv row are rotated as one tensor, with the same result."""

from __future__ import annotations

import pytest
import torch

from ember.model.layers import RotaryEmbedding, _joined_heads, rotary_ref


@pytest.mark.parametrize("tokens", [1, 7])
def test_joined_qk_matches_separate_rotation(tokens: int) -> None:
    torch.manual_seed(0)
    heads, kv_heads, dim = 9, 3, 64
    rot = RotaryEmbedding(dim, 128, 10000.0, None)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    q = qkv[:, :heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim:(heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    pos = torch.tensor([0, 1, 2, 50, 51, 52, 127])[:tokens]
    assert _joined_heads(q, k) is not None
    want_q, want_k = rotary_ref(pos, q.clone(), k.clone(), rot.cos_cache, rot.sin_cache)
    got_q, got_k = rot(pos, q, k)
    torch.testing.assert_close(got_q, want_q, rtol=0, atol=0)
    torch.testing.assert_close(got_k, want_k, rtol=0, atol=0)


def test_separate_tensors_are_not_joined() -> None:
    q, k = torch.randn(4, 2, 16), torch.randn(4, 1, 16)
    assert _joined_heads(q, k) is None
    qkv = torch.randn(4, 5 * 16)
    q = qkv[:, :32].view(4, 2, 16)
    v = qkv[:, 48:].view(4, 2, 16)  # not right after q
    assert _joined_heads(q, v) is None
    rot = RotaryEmbedding(16, 8, 10000.0, None)
    pos = torch.arange(4)
    want = rotary_ref(pos, q.clone(), v.clone(), rot.cos_cache, rot.sin_cache)
    got = rot(pos, q, v)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
