"""The torch reference attention (the kernel tests' oracle) against dense causal attention without paging."""

from __future__ import annotations

import math
import random

import pytest
import torch

from ember.attention.backend import AttentionMetadata
from ember.attention.torch_ref import TorchAttention, gather_kv, paged_attention_ref, store_kv


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the last `q_len` positions of one sequence over its contiguous K/V, written out by hand.

    q: [q_len, heads, dim]; k, v: [seq_len, kv_heads, dim]. Query j sits at position seq_len - q_len + j.
    """
    q_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    qpos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
    kpos = torch.arange(seq_len).unsqueeze(0)
    out = torch.empty_like(q)
    for h in range(num_heads):
        scores = (q[:, h] @ k[:, h // group].T) * scale
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
        weights = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
        out[:, h] = (weights / weights.sum(dim=1, keepdim=True)) @ v[:, h // group]
    return out


class PagedBatch:
    """Sequences with contiguous K/V (the truth) and the same K/V paged into shuffled cache blocks."""

    def __init__(self, q_lens: list[int], seq_lens: list[int], num_kv_heads: int, group: int, head_dim: int,
                 block_size: int, dtype: torch.dtype, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        n_blocks = [math.ceil(s / block_size) for s in seq_lens]
        num_blocks = sum(n_blocks) + 4
        order = torch.randperm(num_blocks, generator=gen).tolist()
        self.block_tables = torch.zeros(len(seq_lens), max(n_blocks) + 1, dtype=torch.int32)
        for i, n in enumerate(n_blocks):
            self.block_tables[i, :n] = torch.tensor(order[:n], dtype=torch.int32)
            order = order[n:]
        self.k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
        self.v_cache = torch.full_like(self.k_cache, float("nan"))
        self.k = [torch.randn(s, num_kv_heads, head_dim, generator=gen, dtype=dtype) for s in seq_lens]
        self.v = [torch.randn(s, num_kv_heads, head_dim, generator=gen, dtype=dtype) for s in seq_lens]
        num_heads = num_kv_heads * group
        self.q = [2 * torch.randn(n, num_heads, head_dim, generator=gen, dtype=dtype) for n in q_lens]
        self.slots = []
        for i, s in enumerate(seq_lens):
            pos = torch.arange(s)
            self.slots.append(self.block_tables[i, pos // block_size].long() * block_size + pos % block_size)
        self.q_lens, self.seq_lens = q_lens, seq_lens
        qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
        qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
        new_slots = torch.cat([sl[s - n:] for sl, n, s in zip(self.slots, q_lens, seq_lens, strict=True)])
        self.meta = AttentionMetadata(new_slots, qsl, torch.tensor(seq_lens, dtype=torch.int32),
                                      self.block_tables, max(q_lens), max(seq_lens), list(q_lens),
                                      list(seq_lens))

    def store_prefixes(self) -> None:
        for k, v, sl, n, s in zip(self.k, self.v, self.slots, self.q_lens, self.seq_lens, strict=True):
            store_kv(k[: s - n], v[: s - n], self.k_cache, self.v_cache, sl[: s - n])

    def store_all(self) -> None:
        for k, v, sl in zip(self.k, self.v, self.slots, strict=True):
            store_kv(k, v, self.k_cache, self.v_cache, sl)

    def new_tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = torch.cat(self.q)
        k = torch.cat([k[s - n:] for k, n, s in zip(self.k, self.q_lens, self.seq_lens, strict=True)])
        v = torch.cat([v[s - n:] for v, n, s in zip(self.v, self.q_lens, self.seq_lens, strict=True)])
        return q, k, v

    def dense(self, scale: float) -> torch.Tensor:
        return torch.cat([dense_causal_attention(q, k, v, scale) for q, k, v in zip(self.q, self.k, self.v,
                                                                                      strict=True)])


def random_mixed_shapes(rng: random.Random, n: int) -> tuple[list[int], list[int]]:
    q_lens, seq_lens = [], []
    for _ in range(n):
        seq_len = rng.randint(1, 90)
        kind = rng.random()
        # A decode, a whole prefill or a chunk after a cached prefix.
        q_len = 1 if kind < 0.4 else seq_len if kind < 0.6 else rng.randint(1, seq_len)
        q_lens.append(q_len)
        seq_lens.append(seq_len)
    return q_lens, seq_lens


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_reference_matches_dense_attention(seed: int, group: int, block_size: int) -> None:
    rng = random.Random(seed * 100 + group * 10 + block_size)
    q_lens, seq_lens = random_mixed_shapes(rng, rng.randint(1, 8))
    b = PagedBatch(q_lens, seq_lens, num_kv_heads=2, group=group, head_dim=16, block_size=block_size,
                   dtype=torch.float64, seed=seed)
    b.store_all()
    scale = 16 ** -0.5
    out = paged_attention_ref(torch.cat(b.q), b.k_cache, b.v_cache, b.meta, scale)
    torch.testing.assert_close(out, b.dense(scale), rtol=1e-10, atol=1e-10)


def test_dense_oracle_is_causal_and_grouped() -> None:
    """The hand-written oracle itself: against SDPA on one sequence, with heads expanded by hand."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 6, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(5, 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(5, 2, 8, generator=gen, dtype=torch.float64)
    k_all, v_all = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k_all.transpose(0, 1), v_all.transpose(0, 1), is_causal=True, scale=0.5)
    expected = expected.transpose(0, 1)
    torch.testing.assert_close(dense_causal_attention(q, k, v, 0.5), expected)
    # The last query sees every key; the first sees only key 0, so its output is v[0] of its KV head.
    torch.testing.assert_close(dense_causal_attention(q, k, v, 0.5)[0], v[0].repeat_interleave(3, 0))


def test_reference_depends_on_block_table() -> None:
    """A wrong page changes the answer, so the comparison above would see a wrong gather.

    (Swapping two full pages would not: the last queries see every key, and attention is blind to key order.)
    """
    b = PagedBatch([3], [40], num_kv_heads=1, group=2, head_dim=16, block_size=16, dtype=torch.float64,
                   seed=1)
    b.store_all()
    scale = 0.25
    q = torch.cat(b.q)
    good = paged_attention_ref(q, b.k_cache, b.v_cache, b.meta, scale)
    torch.testing.assert_close(good, b.dense(scale))
    b.meta.block_tables[0, [0, 2]] = b.meta.block_tables[0, [2, 0]]  # page 2 is partly filled
    bad = paged_attention_ref(q, b.k_cache, b.v_cache, b.meta, scale)
    assert not torch.allclose(bad, good)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_stores_then_attends(dtype: torch.dtype) -> None:
    """TorchAttention with cached prefixes: new K/V land in their slots, padding slots are skipped."""
    q_lens, seq_lens = [1, 6, 0, 13, 1], [17, 30, 5, 13, 1]
    b = PagedBatch(q_lens, seq_lens, num_kv_heads=3, group=3, head_dim=32, block_size=4, dtype=dtype, seed=3)
    b.store_prefixes()
    q, k, v = b.new_tokens()
    # One padding token at the end: slot -1, its row of q/k/v must not touch the cache.
    pad = torch.full((1, *k.shape[1:]), 7.0, dtype=dtype)
    meta = b.meta
    meta.slot_mapping = torch.cat([meta.slot_mapping, torch.tensor([-1])])
    meta.query_start_loc = torch.cat([meta.query_start_loc, meta.query_start_loc[-1:] + 1])
    before = b.k_cache.clone()
    scale = 32 ** -0.5
    out = TorchAttention().forward(torch.cat([q, pad.repeat_interleave(3, 1)]), torch.cat([k, pad]),
                                   torch.cat([v, pad]), b.k_cache, b.v_cache, meta, scale)
    assert not bool((b.k_cache == 7.0).any())
    written = ~torch.isnan(b.k_cache) & torch.isnan(before)
    assert int(written.sum()) == sum(q_lens) * 3 * 32
    for i, s in enumerate(seq_lens):
        torch.testing.assert_close(gather_kv(b.k_cache, b.block_tables[i], s), b.k[i], rtol=0, atol=0)
        torch.testing.assert_close(gather_kv(b.v_cache, b.block_tables[i], s), b.v[i], rtol=0, atol=0)
    expected = torch.cat([dense_causal_attention(qi.double(), ki.double(), vi.double(), scale)
                          for qi, ki, vi in zip(b.q, b.k, b.v, strict=True)])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.shape[0] == q.shape[0] + 1
    torch.testing.assert_close(out[: q.shape[0]].double(), expected, rtol=tol, atol=tol)
