"""Triton KV-store and paged-attention kernels against the torch reference (`ember.attention.torch_ref`).

Runs on CUDA. With `TRITON_INTERPRET=1` it also runs on the CPU through Triton's interpreter (slow; bf16 cases
are skipped there because the interpreter's bf16 `tl.dot` is wrong).

Every case poisons what the kernels must not read or must write: unused cache slots and the padding block 0 of
the block tables hold NaN (an over-read turns the output NaN), and outputs start as NaN (an unwritten element
stays NaN). The reference runs in float64 on the CPU.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET),
                       reason="needs CUDA (or TRITON_INTERPRET=1)"),
]
pytest.importorskip("triton")

from ember.attention.backend import AttentionMetadata  # noqa: E402
from ember.attention.torch_ref import TorchAttention, paged_attention_ref  # noqa: E402
from ember.attention.torch_ref import store_kv as store_kv_ref  # noqa: E402
from ember.attention.triton_backend import TritonAttention  # noqa: E402
from ember.bench.profiling import capture_graph  # noqa: E402
from ember.kernels.paged_attention import (  # noqa: E402
    default_num_splits,
    paged_attention,
    split_kv_decode_attention,
    unified_attention,
)
from ember.kernels.store_kv import store_kv  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Relative error bounds (‖out − ref‖ / ‖ref‖) for the whole output and for each (token, head) row.
TOL = {torch.bfloat16: (1e-2, 3e-2), torch.float16: (2e-3, 6e-3), torch.float32: (1e-5, 1e-4)}


@dataclass(frozen=True)
class Config:
    dtype: torch.dtype
    head_dim: int
    group: int  # query heads per KV head
    block_size: int
    num_kv_heads: int = 2

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{dtype}-d{self.head_dim}-g{self.group}-bs{self.block_size}-kv{self.num_kv_heads}"


CONFIGS = [
    Config(torch.bfloat16, 128, 4, 16, num_kv_heads=8),  # Llama-3.1-8B
    Config(torch.bfloat16, 64, 3, 16, num_kv_heads=3),  # SmolLM2-135M
    Config(torch.bfloat16, 128, 1, 32),
    Config(torch.float16, 64, 4, 16),
    Config(torch.float32, 64, 4, 16),
    Config(torch.float32, 128, 3, 64),
]


def _skip_interpreter_bf16(*dtypes: torch.dtype) -> None:
    if INTERPRET and torch.bfloat16 in dtypes:
        pytest.skip("the Triton interpreter gets bf16 dots and conversions wrong")
    if torch.float8_e4m3fn in dtypes:
        if INTERPRET:
            pytest.skip("the Triton interpreter gets FP8 conversions wrong")
        if torch.cuda.get_device_capability() < (8, 9):
            pytest.skip("FP8 E4M3 conversions need compute capability 8.9")


def _skip_in_interpreter(cfg: Config, twin: Config) -> None:
    """In the interpreter (CI) the config-parametrized tests check index arithmetic: bf16 it gets wrong, and of the
    fp16 and fp32 configs of one shape (CONFIGS[3] and [4]) one runs: `twin` is skipped. Prefill tiles differ
    between them (64 rows in fp16, 16 in fp32), decode tiles do not."""
    _skip_interpreter_bf16(cfg.dtype)
    if INTERPRET and cfg == twin:
        pytest.skip("in the interpreter the config of the same shape in the other dtype covers it")


FP8 = torch.float8_e4m3fn


@dataclass
class Batch:
    q: torch.Tensor
    k: torch.Tensor  # the new tokens' keys and values (not yet in the cache)
    v: torch.Tensor
    k_cache: torch.Tensor  # holds every sequence's prefix; NaN elsewhere
    v_cache: torch.Tensor
    meta: AttentionMetadata


def make_batch(cfg: Config, q_lens: list[int], seq_lens: list[int], seed: int,
               cache_dtype: torch.dtype | None = None, spare_blocks: int = 3) -> Batch:
    """Random sequences over shuffled cache blocks; each prefix (seq_len - q_len tokens) already stored."""
    gen = torch.Generator().manual_seed(seed)
    cache_dtype = cache_dtype or cfg.dtype
    bs, kvh, d = cfg.block_size, cfg.num_kv_heads, cfg.head_dim
    n_blocks = [math.ceil(s / bs) for s in seq_lens]
    # Block 0 is never assigned: it is the padding entry of the block tables, and all NaN.
    num_blocks = 1 + sum(n_blocks) + spare_blocks
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    width = max(n_blocks, default=0) + 2
    block_tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    for i, n in enumerate(n_blocks):
        block_tables[i, :n] = torch.tensor(free[:n], dtype=torch.int32)
        free = free[n:]
    k_cache = torch.full((num_blocks, bs, kvh, d), float("nan"), dtype=cache_dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    ks, vs, slots = [], [], []
    for i, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens, strict=True)):
        pos = torch.arange(seq_len)
        slot = block_tables[i, pos // bs].long() * bs + pos % bs
        k_all = torch.randn(seq_len, kvh, d, generator=gen)
        v_all = torch.randn(seq_len, kvh, d, generator=gen)
        ctx = seq_len - q_len
        store_kv_ref(k_all[:ctx], v_all[:ctx], k_cache, v_cache, slot[:ctx])
        ks.append(k_all[ctx:])
        vs.append(v_all[ctx:])
        slots.append(slot[ctx:])
    num_tokens = sum(q_lens)
    # Scaled so that softmax rows range from flat to peaked.
    q = 2.0 * torch.randn(num_tokens, kvh * cfg.group, d, generator=gen)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int32), 0)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots).to(DEVICE),
        query_start_loc=qsl.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=block_tables.to(DEVICE),
        max_query_len=max(q_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
        query_lens_cpu=list(q_lens),
        seq_lens_cpu=list(seq_lens),
    )
    k, v = torch.cat(ks).to(DEVICE, cfg.dtype), torch.cat(vs).to(DEVICE, cfg.dtype)
    return Batch(q.to(DEVICE, cfg.dtype), k, v, k_cache.to(DEVICE), v_cache.to(DEVICE), meta)


def reference(b: Batch, scale: float) -> torch.Tensor:
    """float64 attention on the CPU over caches that already hold the new tokens."""
    meta = b.meta
    cpu_meta = AttentionMetadata(meta.slot_mapping.cpu(), meta.query_start_loc.cpu(), meta.seq_lens.cpu(),
                                 meta.block_tables.cpu(), meta.max_query_len, meta.max_seq_len,
                                 meta.query_lens_cpu, meta.seq_lens_cpu)
    # The kernels round K/V to q's dtype before the dot, as the reference does: do the same before upcasting.
    kc = b.k_cache.cpu().to(b.q.dtype).double()
    vc = b.v_cache.cpu().to(b.q.dtype).double()
    return paged_attention_ref(b.q.cpu().double(), kc, vc, cpu_meta, scale)


def with_new_kv(b: Batch) -> Batch:
    """The batch with its new tokens stored by the reference store (for tests of attention alone)."""
    kc, vc = b.k_cache.clone(), b.v_cache.clone()
    store_kv_ref(b.k, b.v, kc, vc, b.meta.slot_mapping)
    return Batch(b.q, b.k, b.v, kc, vc, b.meta)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    assert bool(torch.isfinite(out).all()), "NaN/inf in the output: an unwritten element or a poisoned read"
    tol, row_tol = TOL[dtype]
    diff = out.cpu().double() - ref
    rel = (diff.norm() / ref.norm()).item()
    assert rel < tol, f"relative error {rel:.2e} >= {tol:.0e}"
    d = out.shape[-1]
    row_rel = diff.reshape(-1, d).norm(dim=1) / ref.reshape(-1, d).norm(dim=1)
    worst = int(row_rel.argmax())
    assert row_rel[worst] < row_tol, (
        f"row {worst} (token {worst // out.shape[1]}, head {worst % out.shape[1]}): "
        f"relative error {row_rel[worst]:.2e} >= {row_tol:.0e}")


def poisoned_like(q: torch.Tensor) -> torch.Tensor:
    return torch.full_like(q, float("nan"))


# (q_lens, seq_lens) of each batch composition.
CASES: dict[str, tuple[list[int], list[int]]] = {
    # One decode per sequence, lengths around block and tile edges (16, 32, 64) and odd ones.
    "decode": ([1] * 10, [1, 15, 16, 17, 31, 33, 64, 65, 257, 1000]),
    "prefill": ([1, 7, 16, 33, 130], [1, 7, 16, 33, 130]),
    "prefix_chunk": ([5, 16, 33, 64, 1, 100], [21, 48, 40, 300, 17, 100 + 129]),
    # Decodes and chunks in any order, plus a sequence with nothing scheduled.
    "mixed": ([1, 37, 1, 0, 16, 1, 70, 2], [90, 37, 16, 12, 160, 1, 333, 2]),
}


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_paged_attention_matches_reference(cfg: Config, case: str) -> None:
    _skip_in_interpreter(cfg, twin=CONFIGS[4])
    q_lens, seq_lens = CASES[case]
    b = with_new_kv(make_batch(cfg, q_lens, seq_lens, seed=10 * CONFIGS.index(cfg) + list(CASES).index(case)))
    scale = cfg.head_dim ** -0.5
    out = poisoned_like(b.q)
    paged_attention(b.q, b.k_cache, b.v_cache, b.meta.block_tables, b.meta.seq_lens, b.meta.query_start_loc,
                    b.meta.max_query_len, scale, out=out)
    assert_matches(out, reference(b, scale), cfg.dtype)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_paged_attention_with_scattered_tiles(cfg: Config) -> None:
    """`EMBER_ATTN_SCATTER`: the unified kernel's programs take their tiles in a scattered order; every tile is
    still computed once (outputs start as NaN) and the results are those of the plain order, bit for bit."""
    from ember.kernels.paged_attention import _scatter_stride

    _skip_interpreter_bf16(cfg.dtype)
    if INTERPRET and cfg != CONFIGS[3]:
        pytest.skip("in the interpreter (CI) one config: the option is off by default and its order is exercised alike")
    for slots in (1, 2, 10, 12, 97, 4400):
        stride = _scatter_stride(slots)
        assert sorted(i * stride % slots for i in range(slots)) == list(range(slots))
    scale = cfg.head_dim ** -0.5
    for case in ("prefix_chunk", "mixed"):
        q_lens, seq_lens = CASES[case]
        b = with_new_kv(make_batch(cfg, q_lens, seq_lens, seed=200 + list(CASES).index(case)))
        outs = []
        for scatter in (False, True):
            out = poisoned_like(b.q)
            unified_attention(b.q, b.k_cache, b.v_cache, out, b.meta.block_tables, b.meta.seq_lens,
                              b.meta.query_start_loc, b.meta.max_query_len, scale, scatter=scatter)
            outs.append(out)
        assert_matches(outs[1], reference(b, scale), cfg.dtype)
        assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_paged_attention_over_an_fp8_cache(cfg: Config, case: str) -> None:
    """`--kv-cache-dtype fp8`: the kernels read FP8 E4M3 K/V and widen them to q's dtype; the reference widens
    the same cache the same way, so the bf16 bounds hold."""
    _skip_interpreter_bf16(cfg.dtype, FP8)
    q_lens, seq_lens = CASES[case]
    b = with_new_kv(make_batch(cfg, q_lens, seq_lens, seed=100 + list(CASES).index(case), cache_dtype=FP8))
    scale = cfg.head_dim ** -0.5
    out = poisoned_like(b.q)
    paged_attention(b.q, b.k_cache, b.v_cache, b.meta.block_tables, b.meta.seq_lens, b.meta.query_start_loc,
                    b.meta.max_query_len, scale, out=out)
    assert_matches(out, reference(b, scale), cfg.dtype)
    if case == "decode":  # and the split-KV path
        out = poisoned_like(b.q)
        split_kv_decode_attention(b.q, b.k_cache, b.v_cache, out, b.meta.block_tables, b.meta.seq_lens,
                                  b.meta.query_start_loc, scale, 7)
        assert_matches(out, reference(b, scale), cfg.dtype)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("num_splits", [1, 2, 7, 32])
def test_decode_paths(cfg: Config, num_splits: int) -> None:
    """Pure decode batches through the unified kernel (1 split) and the split-KV kernel."""
    _skip_in_interpreter(cfg, twin=CONFIGS[3])
    q_lens, seq_lens = CASES["decode"]
    b = with_new_kv(make_batch(cfg, q_lens, seq_lens, seed=num_splits))
    scale = cfg.head_dim ** -0.5
    out = poisoned_like(b.q)
    args = (b.q, b.k_cache, b.v_cache, out, b.meta.block_tables, b.meta.seq_lens, b.meta.query_start_loc)
    if num_splits == 1:
        unified_attention(*args, 1, scale)
    else:
        split_kv_decode_attention(*args, scale, num_splits)
    assert_matches(out, reference(b, scale), cfg.dtype)


# Decode batches for the split-KV path at 4 splits of 16-key tiles (segments of 32, 48, ... keys: at least two
# tiles): contexts with one active split (<= 32 keys), several, and all four, at segment and tile edges, plus
# padding sequences (q_len 0). Active splits per sequence: 1, 1, -, 1, 2, 2, 3, -, 4, 4.
SPLIT_KV_EDGES = ([1, 1, 0, 1, 1, 1, 1, 0, 1, 1], [1, 16, 0, 17, 48, 64, 65, 5, 100, 128])


def _split_kv_launch(b: Batch, scale: float, counters: torch.Tensor | None, min_tiles: int = 2,
                     table_before_wait: bool = False) -> torch.Tensor:
    out = poisoned_like(b.q)
    split_kv_decode_attention(b.q, b.k_cache, b.v_cache, out, b.meta.block_tables, b.meta.seq_lens,
                              b.meta.query_start_loc, scale, 4, counters=counters, tile_n=16, min_tiles=min_tiles,
                              table_before_wait=table_before_wait)
    return out


# The interpreter runs the programs of a launch one after another, so these check the bookkeeping (which split
# merges, the counter reset), not the races between concurrent splits: the GPU run of the same tests does.
# The variants on one config of each kind (the interpreter runs fp32 only, and slowly).
@pytest.mark.parametrize(("cfg", "min_tiles", "table_before_wait"), [(c, 2, False) for c in CONFIGS] + [
    (c, *variant) for c in (CONFIGS[0], CONFIGS[4]) for variant in ((1, False), (2, True), (1, True))], ids=str)
def test_split_kv_merge_and_counter_reset(cfg: Config, min_tiles: int, table_before_wait: bool) -> None:
    """The same launch twice on one counters buffer: each launch must leave its counters zero for the next. With
    one-tile segments (`min_tiles` 1) the same contexts spread over more splits: 1, 1, -, 2, 3, 4, 3, -, 4, 4.
    `table_before_wait` takes each segment's first tile apart from the rest (`EMBER_ATTN_TABLE_BEFORE_WAIT`)."""
    _skip_in_interpreter(cfg, twin=CONFIGS[3])
    if INTERPRET and (min_tiles, table_before_wait) == (1, False):
        pytest.skip("in the interpreter one-tile segments run with the first tile apart; the tail after a full "
                    "first tile needs min_tiles 2")
    b = with_new_kv(make_batch(cfg, *SPLIT_KV_EDGES, seed=3))
    scale = cfg.head_dim ** -0.5
    ref = reference(b, scale)
    used = len(SPLIT_KV_EDGES[0]) * cfg.num_kv_heads
    # Entries past the batch's (sequence, KV head) pairs belong to nobody: a sentinel shows they stay untouched.
    counters = torch.zeros(used + 8, dtype=torch.int32, device=DEVICE)
    counters[used:] = 7
    for _ in range(2):
        assert_matches(_split_kv_launch(b, scale, counters, min_tiles, table_before_wait), ref, cfg.dtype)
        assert counters[:used].eq(0).all() and counters[used:].eq(7).all()
    # A buffer too small for the batch is not used: the launch zeroes its own.
    small = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    assert_matches(_split_kv_launch(b, scale, small, min_tiles, table_before_wait), ref, cfg.dtype)


@pytest.mark.skipif(INTERPRET, reason="bf16 at Llama shapes: compiled on a GPU")
@pytest.mark.parametrize(("keys", "min_tiles", "warps", "stages"), [
    (128, 2, 4, 2), (256, 1, 8, 2), (256, 1, 4, 2), (128, 1, 4, 2), (64, 1, 4, 2), (64, 2, 4, 5), (128, 2, 4, 5)])
@pytest.mark.parametrize("table_before_wait", [False, True])
def test_split_kv_launch_shapes(keys: int, min_tiles: int, warps: int, stages: int, table_before_wait: bool) -> None:
    """`EMBER_ATTN_SPLIT_KV` shapes and `EMBER_ATTN_TABLE_BEFORE_WAIT` at Llama-3.1-8B shapes: batch-1 contexts at
    tile and segment edges, a batch of several, and long contexts, with the split counts the engine uses at batch
    1 and 8 and a few. (Nothing writes these inputs right before: the kernel before is no PDL kernel.)"""
    cfg = CONFIGS[0]
    scale = cfg.head_dim ** -0.5
    cases = [([1], [n]) for n in (1, 63, 64, 65, 127, 128, 129, 160, 255, 256, 257, 511, 513)]
    cases += [(SPLIT_KV_EDGES[0], [n * 4 for n in SPLIT_KV_EDGES[1]]), ([1, 1, 1], [4000, 1500, 257])]
    for i, (q_lens, seq_lens) in enumerate(cases):
        b = with_new_kv(make_batch(cfg, q_lens, seq_lens, seed=200 + i))
        ref = reference(b, scale)
        for splits in (2, 4, 7, 32):
            out = poisoned_like(b.q)
            split_kv_decode_attention(b.q, b.k_cache, b.v_cache, out, b.meta.block_tables, b.meta.seq_lens,
                                      b.meta.query_start_loc, scale, splits, tile_n=keys, min_tiles=min_tiles,
                                      num_warps=warps, num_stages=stages, table_before_wait=table_before_wait)
            assert_matches(out, ref, cfg.dtype)


def test_split_kv_persistent_counters() -> None:
    """One counters buffer across launches whose context lengths change, as across CUDA-graph replays."""
    cfg = Config(torch.float32 if INTERPRET else torch.bfloat16, 64, 4, 16)
    rng = random.Random(0)
    counters = torch.zeros(1 << 10, dtype=torch.int32, device=DEVICE)
    lens = [1, 15, 16, 17, 32, 33, 48, 63, 64, 65, 96, 97, 128, 200]
    for step in range(6 if INTERPRET else 50):  # on a GPU, more chances for a race to show
        seq_lens = [rng.choice(lens) for _ in range(4)]
        q_lens = [1] * 4
        q_lens[step % 4] = 0  # a padding sequence in a different slot each time
        seq_lens[step % 4] = 0
        b = with_new_kv(make_batch(cfg, q_lens, seq_lens, seed=step))
        scale = cfg.head_dim ** -0.5
        assert_matches(_split_kv_launch(b, scale, counters), reference(b, scale), cfg.dtype)
        assert counters.eq(0).all()


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="the prefetch runs under PDL on a GPU")
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("cache_dtype", [None, FP8], ids=["cache-as-q", "fp8-cache"])
def test_split_kv_prefetch_before_the_wait_leaves_results_unchanged(cfg: Config,
                                                                    cache_dtype: torch.dtype | None) -> None:
    """`EMBER_ATTN_PREFETCH`: the split-KV programs ask L2 for their K/V before the PDL wait (Hopper and later).
    The outputs are those of the launch without it, bit for bit, at segment and tile edges and long contexts, and
    nothing out of bounds is asked for. Nothing writes the cache while these run (the kernel before is no PDL
    kernel): tests/gpu/test_gemv.py overlaps the writer."""
    from ember.kernels.pdl import use_pdl

    if not use_pdl(torch.device(DEVICE)):
        pytest.skip("PDL needs Hopper or later (and EMBER_PDL on)")
    if cache_dtype is not None:
        if cfg.dtype == torch.float32:
            pytest.skip("an FP8 cache serves 16-bit models")
        _skip_interpreter_bf16(cache_dtype)
    scale = cfg.head_dim ** -0.5
    long = ([1, 1, 1], [4000, 1500, 257])
    for i, (q_lens, seq_lens) in enumerate((SPLIT_KV_EDGES, CASES["decode"], long)):
        b = with_new_kv(make_batch(cfg, q_lens, seq_lens, seed=50 + i, cache_dtype=cache_dtype))
        for splits in (2, 7, 32):
            outs = []
            for prefetch in (False, True):
                out = poisoned_like(b.q)
                split_kv_decode_attention(b.q, b.k_cache, b.v_cache, out, b.meta.block_tables, b.meta.seq_lens,
                                          b.meta.query_start_loc, scale, splits, prefetch=prefetch)
                outs.append(out)
            assert torch.equal(outs[0], outs[1]), (i, splits)
            if cache_dtype is None:
                assert_matches(outs[1], reference(b, scale), cfg.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_seqs", [1, 3, 24])
def test_long_context_decode(dtype: torch.dtype, num_seqs: int) -> None:
    """Llama-3.1-8B shapes at a few thousand tokens, with the default split choice."""
    _skip_interpreter_bf16(dtype)
    if INTERPRET and num_seqs > 3:
        pytest.skip("too slow in the interpreter")
    cfg = Config(dtype, 128, 4, 16, num_kv_heads=8)
    rng = random.Random(num_seqs)
    seq_lens = [rng.randint(1500, 4200) for _ in range(num_seqs)]
    b = with_new_kv(make_batch(cfg, [1] * num_seqs, seq_lens, seed=num_seqs))
    scale = cfg.head_dim ** -0.5
    out = poisoned_like(b.q)
    paged_attention(b.q, b.k_cache, b.v_cache, b.meta.block_tables, b.meta.seq_lens, b.meta.query_start_loc,
                    1, scale, out=out)
    assert_matches(out, reference(b, scale), dtype)


@pytest.mark.parametrize("seed", range(4))
def test_random_mixed_batches(seed: int) -> None:
    """Many sequences of random chunk/decode shapes, in random order."""
    rng = random.Random(seed)
    dtype = torch.float32 if INTERPRET else torch.bfloat16
    cfg = Config(dtype, head_dim=rng.choice([64, 128]), group=rng.choice([1, 3, 4]),
                 block_size=rng.choice([16, 32]), num_kv_heads=rng.choice([1, 2, 4]))
    q_lens, seq_lens = [], []
    for _ in range(rng.randint(1, 12 if INTERPRET else 40)):
        seq_len = rng.randint(1, 600)
        q_len = 1 if rng.random() < 0.5 else rng.randint(1, min(seq_len, 200))
        q_lens.append(q_len)
        seq_lens.append(seq_len)
    b = with_new_kv(make_batch(cfg, q_lens, seq_lens, seed=seed))
    scale = cfg.head_dim ** -0.5
    out = poisoned_like(b.q)
    paged_attention(b.q, b.k_cache, b.v_cache, b.meta.block_tables, b.meta.seq_lens, b.meta.query_start_loc,
                    b.meta.max_query_len, scale, out=out)
    assert_matches(out, reference(b, scale), dtype)


@pytest.mark.parametrize(("dtype", "cache_dtype"), [
    (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.float32, torch.bfloat16),
    (torch.float16, torch.float16), (torch.bfloat16, FP8), (torch.float32, FP8)])
@pytest.mark.parametrize("num_kv_heads", [1, 3, 8])
def test_store_kv_matches_reference(dtype: torch.dtype, cache_dtype: torch.dtype, num_kv_heads: int) -> None:
    _skip_interpreter_bf16(dtype, cache_dtype)
    gen = torch.Generator().manual_seed(num_kv_heads)
    num_blocks, bs, d, n = 9, 16, 64, 50
    # k and v as strided views of one fused projection, as the model hands them over.
    kv = torch.randn(n, 3 * num_kv_heads * d, generator=gen).to(DEVICE, dtype)
    k = kv[:, : num_kv_heads * d].view(n, num_kv_heads, d)
    v = kv[:, 2 * num_kv_heads * d:].view(n, num_kv_heads, d)
    slots = torch.randperm(num_blocks * bs, generator=gen)[:n]
    slots[::7] = -1  # padding tokens
    slots = slots.to(DEVICE)
    init = torch.randn(num_blocks, bs, num_kv_heads, d, generator=gen).to(DEVICE, cache_dtype)
    kc, vc = init.clone(), init.clone()
    kc_ref, vc_ref = init.clone(), init.clone()
    store_kv(k, v, kc, vc, slots)
    store_kv_ref(k, v, kc_ref, vc_ref, slots)
    # Widened to float: assert_close has no FP8 (both sides' values are exact in float32).
    torch.testing.assert_close(kc.float(), kc_ref.float(), rtol=0, atol=0)
    torch.testing.assert_close(vc.float(), vc_ref.float(), rtol=0, atol=0)
    assert not torch.equal(kc.float(), init.float())


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[1], CONFIGS[4]], ids=str)
def test_backend_forward_matches_torch_backend(cfg: Config) -> None:
    """The whole backend: store the new tokens, then attend (mixed batch), against TorchAttention."""
    _skip_interpreter_bf16(cfg.dtype)
    q_lens, seq_lens = CASES["mixed"]
    b = make_batch(cfg, q_lens, seq_lens, seed=7)
    scale = cfg.head_dim ** -0.5
    kc, vc = b.k_cache.clone(), b.v_cache.clone()
    out = TritonAttention().forward(b.q, b.k, b.v, kc, vc, b.meta, scale)
    kc_ref, vc_ref = b.k_cache.clone(), b.v_cache.clone()
    TorchAttention().forward(b.q, b.k, b.v, kc_ref, vc_ref, b.meta, scale)
    torch.testing.assert_close(kc, kc_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0, equal_nan=True)
    assert_matches(out, reference(Batch(b.q, b.k, b.v, kc, vc, b.meta), scale), cfg.dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("num_seqs", [2, 40])
def test_decode_is_cuda_graph_capturable(num_seqs: int) -> None:
    """Capture one decode step, then replay it with other lengths and block tables written into its inputs."""
    cfg = Config(torch.bfloat16, 128, 4, 16, num_kv_heads=8)
    # Both paths get captured: few sequences split the context, many take the unified kernel.
    expect_split = default_num_splits(num_seqs, cfg.num_kv_heads, DEVICE) > 1
    assert expect_split == (num_seqs == 2)
    rng = random.Random(num_seqs)
    batches = [with_new_kv(make_batch(cfg, [1] * num_seqs, [rng.randint(1, 700) for _ in range(num_seqs)],
                                      seed=s, spare_blocks=60)) for s in range(3)]
    # Static inputs sized for the largest batch; every replay copies a batch into them.
    width = max(b.meta.block_tables.shape[1] for b in batches)
    num_blocks = max(b.k_cache.shape[0] for b in batches)
    first = batches[0]
    q = first.q.clone()
    k_cache = torch.full((num_blocks, *first.k_cache.shape[1:]), float("nan"), dtype=cfg.dtype, device=DEVICE)
    v_cache = k_cache.clone()
    block_tables = torch.zeros(num_seqs, width, dtype=torch.int32, device=DEVICE)
    seq_lens = first.meta.seq_lens.clone()
    qsl = first.meta.query_start_loc.clone()
    scale = cfg.head_dim ** -0.5
    # Split-KV arrival counters made before the capture and kept across replays, as TritonAttention does.
    counters = torch.zeros(1 << 16, dtype=torch.int32, device=DEVICE)

    def load(b: Batch) -> None:
        q.copy_(b.q)
        k_cache.fill_(float("nan"))
        v_cache.fill_(float("nan"))
        k_cache[: b.k_cache.shape[0]].copy_(b.k_cache)
        v_cache[: b.v_cache.shape[0]].copy_(b.v_cache)
        block_tables.zero_()
        block_tables[:, : b.meta.block_tables.shape[1]].copy_(b.meta.block_tables)
        seq_lens.copy_(b.meta.seq_lens)

    def step() -> torch.Tensor:
        return paged_attention(q, k_cache, v_cache, block_tables, seq_lens, qsl, 1, scale, counters=counters)

    load(first)
    captured = []  # the warm-up's output, then the graph's
    graph = capture_graph(lambda: captured.append(step()))
    out = captured[-1]
    for b in batches[1:] + batches[:1]:
        load(b)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(out, reference(b, scale), cfg.dtype)
