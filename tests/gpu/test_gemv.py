"""ember's batch-1 GEMV (`ember/kernels/gemv.py`) against `F.linear`: many shapes (odd row counts, K not a multiple
of the tile, K below one tile), bias, both 16-bit dtypes, with and without the L2 prefetch; and `Linear` sends
one-row products to it on a GPU and every other product to `F.linear`. On the CPU the small cases run through
Triton's interpreter (tests/attention/test_kernels_interpreted.py), in fp16."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from ember.bench.profiling import capture_graph
from ember.kernels import gemv as gemv_mod
from ember.kernels.gemv import GemvConfig, gemv, gemv_silu_mul
from ember.model.layers import GatedMLP, silu_mul_ref
from ember.model.linear import Linear, linear_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA (or TRITON_INTERPRET=1)")
DTYPES = [torch.float16] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]


def _inputs(n: int, k: int, dtype: torch.dtype, bias: bool, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(1, k, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,bias", [(6144, 4096, False), (37, 4096, True), (1, 64, False), (130, 1000, True),
                                      (4096, 14336, False), (9, 2056, False)])
@pytest.mark.parametrize("prefetch", [0, 1 << 20])
def test_gemv_matches_linear(dtype: torch.dtype, n: int, k: int, bias: bool, prefetch: int) -> None:
    if DEVICE == "cpu" and n * k > 1 << 20:
        pytest.skip("large shapes run compiled on a GPU; the interpreter is slow")
    x, w, b = _inputs(n, k, dtype, bias, n + k)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    got = gemv(x, w, b, prefetch_bytes=prefetch)
    assert got.shape == (1, n) and got.dtype == dtype
    # fp32 sums over K in a different order than the reference, then one 16-bit rounding.
    tol = 1e-2 * want.abs().max().item() + 1e-3
    assert (got.float() - want).abs().max().item() <= tol


@pytest.mark.parametrize("config", [GemvConfig(1, 512, 4), GemvConfig(8, 1024, 8, 3), GemvConfig(2, 2048, 4, 4)])
def test_gemv_launch_shapes_agree(config: GemvConfig) -> None:
    """Every launch shape the benchmark sweeps computes the same product, rows past N and the K tail included."""
    n, k = (45, 1000) if DEVICE == "cpu" else (1027, 4100)
    x, w, _ = _inputs(n, k, torch.float16, False, 7)
    want = F.linear(x.float(), w.float())
    # Rows of 8,200 bytes: the L2 prefetch asked for must be skipped (its addresses take 16-byte alignment).
    got = gemv(x, w, config=config, prefetch_bytes=1 << 20)
    assert (got.float() - want).abs().max().item() <= 1e-2 * want.abs().max().item() + 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,config", [(6144, 4096, None), (37, 1000, None), (130, 2056, GemvConfig(8, 1024, 8)),
                                        (5, 64, GemvConfig(1, 512, 4))])
@pytest.mark.parametrize("norm,residual", [(True, False), (False, True), (True, True)])
def test_gemv_norm_and_residual_match_linear_ref(dtype: torch.dtype, n: int, k: int, config: GemvConfig | None,
                                                  norm: bool, residual: bool) -> None:
    """RMS normalisation of x before the product and a residual added after it: the folded-norm path's products."""
    if DEVICE == "cpu" and n * k > 1 << 20:
        pytest.skip("large shapes run compiled on a GPU; the interpreter is slow")
    x, w, _ = _inputs(n, k, dtype, False, n * 3 + k)
    x = x * 7  # a norm far from 1, so a missing or doubled normalisation shows
    r = torch.randn(1, n, generator=torch.Generator(device="cpu").manual_seed(k)).to(dtype).to(DEVICE) * 3
    kw = {"rms_eps": 1e-5 if norm else None, "residual": r if residual else None}
    want = linear_ref(x.float(), w.float(), **{**kw, "residual": r.float() if residual else None})
    got = gemv(x, w, config=config, **kw)
    assert got.shape == (1, n) and got.dtype == dtype
    assert (got.float() - want).abs().max().item() <= 1e-2 * want.abs().max().item() + 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,k", [(32, 8, 128, 4096), (9, 3, 64, 576), (6, 2, 64, 128),
                                                     (4, 4, 32, 100)])
@pytest.mark.parametrize("norm,bias,slot", [(False, False, 21), (True, True, 5), (True, False, -1)])
def test_gemv_rotary_store_kv_matches_the_unfused_path(dtype: torch.dtype, heads: int, kv_heads: int,
                                                       head_dim: int, k: int, norm: bool, bias: bool,
                                                       slot: int) -> None:
    """The qkv product with rotary and the KV store in its epilogue against the product, `rotary_ref` and
    `torch_ref.store_kv` (slot -1: a padding token, nothing stored). Unwritten cache slots hold NaN and must
    stay NaN."""
    from ember.attention.torch_ref import store_kv as store_kv_ref
    from ember.kernels.gemv_qkv import gemv_rotary_store_kv
    from ember.model.layers import RotaryEmbedding, rotary_ref

    n = (heads + 2 * kv_heads) * head_dim
    if DEVICE == "cpu" and n * k > 1 << 19:  # SmolLM2's shape took 10 s; grouped heads run on (6, 2, 64) there
        pytest.skip("large shapes run compiled on a GPU; the interpreter is slow")
    if DEVICE == "cpu" and heads != kv_heads and not (norm and bias):
        pytest.skip("in the interpreter the grouped-heads shape with norm and bias; each option on the small shape")
    x, w, b = _inputs(n, k, dtype, bias, heads + k)
    rot = RotaryEmbedding(head_dim, 2048, 500000.0)
    rot.build_cache(DEVICE)
    pos = torch.tensor([1234], device=DEVICE)
    slots = torch.tensor([slot], device=DEVICE)
    kc = torch.full((3, 16, kv_heads, head_dim), float("nan"), device=DEVICE, dtype=dtype)
    vc = kc.clone()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    eps = 1e-5 if norm else None
    qkv = linear_ref(x.float(), w.float(), None if b is None else b.float(), rms_eps=eps).to(dtype)
    q, kk, v = (t.view(1, -1, head_dim) for t in qkv.split([heads * head_dim, kv_heads * head_dim,
                                                             kv_heads * head_dim], dim=-1))
    ref_q, ref_k = rotary_ref(pos, q, kk, rot.cos_cache, rot.sin_cache)
    store_kv_ref(ref_k, v, kc_ref, vc_ref, slots)

    got_q = gemv_rotary_store_kv(x, w, b, heads, kv_heads, kc, vc, slots, pos, rot.cos_cache, rot.sin_cache,
                                 rms_eps=eps)
    assert got_q.shape == (1, heads, head_dim) and got_q.dtype == dtype
    tol = 1e-2 * qkv.float().abs().max().item() + 1e-3
    assert (got_q.float() - ref_q.float()).abs().max().item() <= tol
    for got, want in ((kc, kc_ref), (vc, vc_ref)):
        assert torch.equal(got.isnan(), want.isnan())
        assert (got.float().nan_to_num() - want.float().nan_to_num()).abs().max().item() <= tol
    # Against the kernels it replaces (the GEMV, then the rotary KV store): the same sums, rounded alike, so v is
    # stored bit for bit and q and k differ at most by a last-place rounding of the rotation.
    from ember.kernels.store_kv import rotary_store_kv

    q2, k2, v2 = (t.view(1, -1, head_dim) for t in gemv(x, w, b, rms_eps=eps).split(
        [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1))
    kc2, vc2 = torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))
    rotary_store_kv(q2, k2, v2, kc2, vc2, slots, pos, rot.cos_cache, rot.sin_cache)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    torch.testing.assert_close(vc, vc2, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got_q, q2, rtol=ulp, atol=1e-6)
    torch.testing.assert_close(kc, kc2, rtol=ulp, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter,k,config", [(14336, 4096, None), (37, 1000, None), (5, 64, GemvConfig(4, 512, 4)),
                                            (300, 2056, GemvConfig(8, 1024, 8))])
def test_gemv_silu_mul_matches_the_unfused_path(dtype: torch.dtype, inter: int, k: int,
                                                config: GemvConfig | None) -> None:
    if DEVICE == "cpu" and inter * k > 1 << 20:
        pytest.skip("large shapes run compiled on a GPU; the interpreter is slow")
    x, w, _ = _inputs(2 * inter, k, dtype, False, inter)
    want = silu_mul_ref(F.linear(x.float(), w.float()).to(dtype)).float()
    got = gemv_silu_mul(x, w, config=config, prefetch_bytes=1 << 20)
    assert got.shape == (1, inter) and got.dtype == dtype
    assert (got.float() - want).abs().max().item() <= 2e-2 * want.abs().max().item() + 1e-3


@pytest.mark.skipif(DEVICE == "cpu", reason="the MLP takes the fused GEMV on GPUs only")
def test_gated_mlp_fuses_silu_mul_at_one_row(monkeypatch: pytest.MonkeyPatch) -> None:
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the GEMV serves Hopper and later")
    mlp = GatedMLP(256, 384).to(torch.bfloat16).cuda()
    monkeypatch.setattr(gemv_mod, "FUSE_SILU_MUL", True)  # an option, off by default
    calls = []
    real = gemv_mod.gemv_silu_mul
    monkeypatch.setattr(gemv_mod, "gemv_silu_mul", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    for m in (1, 3):
        x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
        h = silu_mul_ref(F.linear(x, mlp.gate_up_proj.weight))
        want = F.linear(h.float(), mlp.down_proj.weight.float())
        assert (mlp(x).float() - want).abs().max().item() <= 3e-2 * want.abs().max().item()
    assert calls == [(1, 256)]
    monkeypatch.setattr(gemv_mod, "FUSE_SILU_MUL", False)
    mlp(torch.randn(1, 256, device="cuda", dtype=torch.bfloat16))
    assert calls == [(1, 256)]


@pytest.mark.skipif(DEVICE == "cpu", reason="FP8 weights: compiled on a GPU only")
def test_fp8_gemv_prefetch_leaves_the_product_unchanged() -> None:
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the GEMV's prefetch serves Hopper and later")
    from ember.kernels.fp8_gemv import fp8_gemv
    from ember.model.fp8 import quantize_rows

    x, w, _ = _inputs(1000, 4096, torch.bfloat16, False, 3)
    q, scale = quantize_rows(w)
    plain = fp8_gemv(x, q, scale.reshape(-1).contiguous(), prefetch_bytes=0)
    fetched = fp8_gemv(x, q, scale.reshape(-1).contiguous(), prefetch_bytes=1 << 20)
    assert torch.equal(plain, fetched)


@pytest.mark.skipif(DEVICE == "cpu", reason="Linear sends products to the GEMV on GPUs only")
def test_linear_takes_the_gemv_for_one_row_only(monkeypatch: pytest.MonkeyPatch) -> None:
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the GEMV serves Hopper and later")
    calls = []
    real = gemv_mod.gemv
    monkeypatch.setattr(gemv_mod, "gemv", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    linear = Linear(256, 96, bias=True).to(torch.bfloat16).cuda()
    for m in (1, 2, 8):
        x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
        want = F.linear(x.float(), linear.weight.float(), linear.bias.float())
        assert (linear(x).float() - want).abs().max().item() <= 2e-2 * want.abs().max().item()
    linear.float()(torch.randn(1, 256, device="cuda"))  # fp32: cuBLAS
    assert calls == [(1, 256)]
    monkeypatch.setattr(gemv_mod, "ENABLED", False)
    linear.to(torch.bfloat16)(torch.randn(1, 256, device="cuda", dtype=torch.bfloat16))
    assert calls == [(1, 256)]


@pytest.mark.skipif(DEVICE == "cpu", reason="PDL runs on a GPU")
@pytest.mark.parametrize("context", [1, 40, 200, 1500])
def test_qkv_released_at_its_wait_before_prefetching_attention(monkeypatch: pytest.MonkeyPatch,
                                                               context: int) -> None:
    """`EMBER_ATTN_PREFETCH`: the fused qkv GEMV releases attention right after its wait, and attention asks L2
    for the context's K/V before its own. Attention must still see the q and the newest k/v that the GEMV
    writes: replayed in a CUDA graph at growing positions, its inputs copied in from pinned host memory as the
    engine's are, the chain gives what it gives without either, bit for bit (same kernels, same arithmetic; the
    chain without them is checked against the torch reference by the tests above and test_attention_kernels)."""
    from ember.kernels import gemv_qkv
    from ember.kernels import paged_attention as attention_mod
    from ember.kernels.pdl import use_pdl
    from ember.model.layers import RotaryEmbedding

    if not use_pdl(torch.device(DEVICE)):
        pytest.skip("PDL needs Hopper or later (and EMBER_PDL on)")
    heads, kv_heads, head_dim, k, bs = 32, 8, 128, 4096, 16
    dtype = torch.bfloat16
    x, w, _ = _inputs((heads + 2 * kv_heads) * head_dim, k, dtype, False, context)
    rot = RotaryEmbedding(head_dim, 4096, 500000.0)
    rot.build_cache(DEVICE)
    steps = 12
    blocks = (context + steps) // bs + 2
    g = torch.Generator().manual_seed(context)
    table = (torch.randperm(blocks + 4, generator=g)[:blocks] + 1).to(torch.int32)
    cache0 = torch.randn(blocks + 5, bs, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    pos = torch.zeros(1, dtype=torch.long, device=DEVICE)
    slot = torch.zeros(1, dtype=torch.long, device=DEVICE)
    seq_lens = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    qsl = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    block_tables = table.view(1, -1).to(DEVICE)
    counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)

    def run(fast: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(gemv_qkv, "RELEASE_AT_WAIT", fast)
        monkeypatch.setattr(attention_mod, "PREFETCH_BEFORE_WAIT", fast)
        kc, vc = cache0.clone(), cache0.clone()

        def chain() -> torch.Tensor:
            q = gemv_qkv.gemv_rotary_store_kv(x, w, None, heads, kv_heads, kc, vc, slot, pos, rot.cos_cache,
                                              rot.sin_cache)
            return attention_mod.paged_attention(q, kc, vc, block_tables, seq_lens, qsl, 1, head_dim ** -0.5,
                                                 num_splits=16, counters=counters)

        host = torch.zeros(3, dtype=torch.long).pin_memory()

        def at(p: int) -> None:
            torch.cuda.synchronize()  # the pinned buffer is reused
            host[0], host[1], host[2] = p, int(table[p // bs]) * bs + p % bs, p + 1
            pos.copy_(host[0:1], non_blocking=True)
            slot.copy_(host[1:2], non_blocking=True)
            seq_lens.copy_(host[2:3], non_blocking=True)

        at(context)
        captured = []  # the warm-up's output, then the graph's
        graph = capture_graph(lambda: captured.append(chain()))
        out = captured[-1]
        outs = []
        for p in range(context, context + steps):
            at(p)
            graph.replay()
            outs.append(out.clone())
        outs += [kc.clone(), vc.clone()]
        return outs

    plain, fast = run(False), run(True)
    for a, b in zip(plain, fast, strict=True):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)
