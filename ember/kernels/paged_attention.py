"""Paged attention for mixed prefill/decode batches, in Triton. Torch twin: `paged_attention_ref`.

Two launch shapes share one inner loop (`_attend_kv_range`, an online softmax over KV tiles read through the
block table):

- unified: one program per (sequence, query tile, KV head). The query heads of one KV group are packed into
  the rows of the tile (row m is query `m // GROUP`, head `m % GROUP` of the group), so a decode (q_len 1)
  still fills 16 rows and runs on tensor cores, and each K/V tile is loaded once for the whole group. Prefill
  chunks with a cached prefix use the same path: the causal mask is offset by the prefix length.
- split-KV (flash-decoding), for decode-only batches too small to fill the SMs with one program per
  (sequence, KV head): the context is cut into `num_splits` segments that run in parallel and write partial
  results (output and log-sum-exp); the last program of each (sequence, KV head) to finish, known from an
  arrival counter, merges them in the same launch. A context that fits one segment skips the partials.

Neither path syncs with the host: grids come from tensor shapes and the static `max_query_len`, lengths are
read on the device, so decode batches can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ember.kernels.pdl import (
    ATTENTION_PREFETCH,
    pdl_launch_args,
    pdl_release,
    pdl_release_early,
    pdl_release_late,
    pdl_small_kernel_args,
    pdl_wait,
    sm_count,
    use_pdl,
)

_LOG2E = 1.4426950408889634
MAX_SPLITS = 32
# Split-KV programs launched with PDL ask L2 for the K/V rows of their segment's first two tiles before their wait
# (`_prefetch_segment_l2`): at batch 1 the context's K/V was last read a whole step ago and is long out of L2.
PREFETCH_BEFORE_WAIT = ATTENTION_PREFETCH
# `EMBER_ATTN_SCATTER=1` (experimental, off: the offline launch 7 % faster on an H100, the run within its noise): the
# unified kernel's programs take their tiles in a scattered order (`_scatter_stride`). A mixed step's batch lists its
# decodes first, and programs start roughly in grid order, so the decodes' tiles (bound by K/V bandwidth) and the
# prefill chunks' tiles (bound by the tensor cores) otherwise run mostly one after the other: one launch measured as
# long as the two halves apart (docs/PERFORMANCE.md, fourteenth session). Scattered, every wave holds both kinds.
SCATTER_TILES = os.environ.get("EMBER_ATTN_SCATTER", "0") == "1"


def _split_kv_shape(spec: str | None) -> tuple[int | None, int, int, int]:
    """`EMBER_ATTN_SPLIT_KV=KEYS,MIN_TILES,WARPS[,STAGES]` (experimental, unset: up to 128 keys a tile, 2, 4, 2): the
    split-KV launch shape. At batch 1 a short context is one or two tiles, each tile a chain of dependent loads
    (block table, then K and V) before its products; e.g. `256,1,8` reads up to 256 keys in one tile, one chain,
    and a context needs as many programs as it has such tiles. With Triton 3.6 a loop over tiles gets a second K/V
    buffer (the next tile's copies in flight during this one's products) from 5 stages on, not at 2 to 4; with bf16
    and head_dim 128 that fits a Hopper block's shared memory up to 128 keys (Triton refuses larger launches)."""
    if not spec:
        return None, 2, 4, 2
    fields = spec.split(",")
    try:
        if len(fields) not in (3, 4):
            raise ValueError
        keys, min_tiles, warps, stages = (int(x) for x in fields + ["2"] * (4 - len(fields)))
    except ValueError:
        raise ValueError(f"EMBER_ATTN_SPLIT_KV={spec!r}: expected KEYS,MIN_TILES,WARPS[,STAGES], e.g. 256,1,8"
                         ) from None
    if keys < 16 or keys & (keys - 1) or min_tiles < 1 or warps not in (1, 2, 4, 8) or not 1 <= stages <= 8:
        raise ValueError(f"EMBER_ATTN_SPLIT_KV={spec!r}: KEYS a power of 2 from 16, MIN_TILES >= 1, WARPS 1/2/4/8, "
                         "STAGES 1 to 8")
    return keys, min_tiles, warps, stages


SPLIT_KV_SHAPE = _split_kv_shape(os.environ.get("EMBER_ATTN_SPLIT_KV"))
# `EMBER_ATTN_TABLE_BEFORE_WAIT=1` (experimental, off until measured): split-KV programs launched with PDL read the
# lengths and their first tile's block-table entries before their wait, leaving q and K/V to load after it.
TABLE_BEFORE_WAIT = os.environ.get("EMBER_ATTN_TABLE_BEFORE_WAIT", "0") == "1"


@triton.jit
def _find_seq(query_start_loc_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose query tiles contain program `pid`.

    Sequence i owns the programs from `query_start_loc[i] // BLOCK_Q + i` on; that start is strictly
    increasing in i and leaves room for the sequence's `ceil(q_len / BLOCK_Q)` tiles, so a binary search finds
    the owner and the grid never needs the per-sequence tile counts on the host.
    """
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        tile_start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if tile_start <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_kv_range(
    q, acc, m_i, l_i,
    k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head, kv_start, kv_end, q_pos,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    scale_log2e,
    MASK: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of (acc, m_i, l_i) with keys [kv_start, kv_end) of one sequence and KV head.

    With MASK off the caller guarantees that every key of every tile is in range and visible to every row, so
    the loads and the scores go unpredicated; with MASK on, key `n` is visible to row `r` iff
    `n < kv_end and n <= q_pos[r]` (q_pos: each row's absolute query position).
    """
    offs_n = tl.arange(0, TILE_N)
    for start in range(kv_start, kv_end, TILE_N):
        kpos = start + offs_n
        # Keys come one cache row at a time through the block table, so a tile may span several blocks and
        # TILE_N need not equal the block size.
        if MASK:
            block = tl.load(block_table_ptr + kpos // BLOCK_SIZE, mask=kpos < kv_end, other=0)
        else:
            block = tl.load(block_table_ptr + kpos // BLOCK_SIZE)
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block, kv_head, start, kv_end, q_pos,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale_log2e,
            MASK, BLOCK_SIZE, HEAD_DIM, TILE_N, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i,
    k_cache_ptr, v_cache_ptr, block, kv_head, start, kv_end, q_pos,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    scale_log2e,
    MASK: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The online-softmax update with keys [start, start + TILE_N), whose cache blocks `block` holds (one entry a
    key, from the block table; under MASK, keys from kv_end on are left out whatever their entry). V is loaded
    after the scores: in a pipelined loop the copies of both are in flight anyway."""
    offs_d = tl.arange(0, HEAD_DIM)
    kpos = start + tl.arange(0, TILE_N)
    block = block.to(tl.int64)
    in_block = kpos % BLOCK_SIZE
    k_off = block * stride_kb + in_block * stride_ks + kv_head * stride_kh
    v_off = block * stride_vb + in_block * stride_vs + kv_head * stride_vh
    if MASK:
        kmask = kpos < kv_end
        k = tl.load(k_cache_ptr + k_off[:, None] + offs_d[None, :], mask=kmask[:, None], other=0.0)
    else:
        k = tl.load(k_cache_ptr + k_off[:, None] + offs_d[None, :])
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2e
    if MASK:
        visible = kmask[None, :] & (kpos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead keeps exp2 off NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(s - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASK:
        v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :], mask=kmask[:, None], other=0.0)
    else:
        v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :])
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# Integers that change from step to step are not specialized on (Triton compiles a variant for a value of 1 and
# for multiples of 16): in eager mode each new variant was a JIT compile, ~0.8 s, in the middle of serving.
# stride_bt is the widest block table of the batch, 1 for short sequences.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt", "tile_stride"])
def _unified_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale_log2e, num_seqs, tile_stride,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr, SCATTER: tl.constexpr,
):
    pdl_wait(USE_PDL)
    pid = tl.program_id(0)
    if SCATTER:  # a bijection of the tile slots: tile_stride is coprime with their number
        pid = ((pid.to(tl.int64) * tile_stride) % tl.num_programs(0)).to(tl.int32)
    kv_head = tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, pid, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    tile = pid - (q_start // BLOCK_Q + seq)
    if tile * BLOCK_Q >= q_len:  # the grid is an upper bound on the number of tiles
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_idx = tile * BLOCK_Q + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    # BLOCK_M need not be a multiple of GROUP (GQA ratio 3): the last rows then hold no query.
    row_mask = (offs_m // GROUP < BLOCK_Q) & (q_idx < q_len)
    token = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask[:, None], other=0.0)
    q_pos = context_len + q_idx

    # Keys past the tile's last query are invisible to all its rows; keys before its first query are visible
    # to all of them, so only the tiles from there on pay for the mask.
    first_q = context_len + tile * BLOCK_Q
    kv_end = tl.minimum(seq_len, context_len + tl.minimum(q_len, (tile + 1) * BLOCK_Q))
    kv_full = tl.minimum(first_q // TILE_N * TILE_N, kv_end // TILE_N * TILE_N)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_kv_range(
        q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head, 0, kv_full, q_pos,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale_log2e,
        False, BLOCK_SIZE, HEAD_DIM, TILE_N, DOT_PRECISION)
    acc, m_i, l_i = _attend_kv_range(
        q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head, kv_full, kv_end, q_pos,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale_log2e,
        True, BLOCK_SIZE, HEAD_DIM, TILE_N, DOT_PRECISION)

    pdl_release(USE_PDL)
    # l_i is 0 only for an empty context (a padding sequence): write zeros rather than NaN.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


@triton.jit
def _segment_len(seq_len, num_splits, TILE_N: tl.constexpr, MIN_TILES: tl.constexpr):
    """Keys per split, a multiple of TILE_N so that only a segment's last tile needs a mask, and at least
    MIN_TILES tiles: a shorter context then runs as one split per KV head and skips the merge (by default two: at
    batch 1 on an H200, two 128-key splits and their merge took longer than one program reading 160 keys)."""
    return tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), TILE_N), MIN_TILES) * TILE_N


@triton.jit
def _merge_splits(
    part_out_ptr, part_lse_ptr, out_ptr, seq64, token, kv_head, active,
    stride_ps, stride_ph, stride_ls, stride_lh, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS_P: tl.constexpr,
):
    """Writes the output of the GROUP query heads of `kv_head`: the `active` (>= 2) partials, weighted by their
    log2-sum-exp. Every partial covers a non-empty segment, so every weight is finite and their sum >= 1."""
    offs_s = tl.arange(0, SPLITS_P)
    offs_d = tl.arange(0, HEAD_DIM)
    split_mask = offs_s < active
    # One [splits, dim] tile per head keeps registers low for any GROUP. The partials are read once and mostly
    # come from other SMs: `.cg` takes them from L2 without filling L1 (their visibility comes from the
    # counter's acquire, not from the cache hint).
    for g in tl.static_range(GROUP):
        head = kv_head * GROUP + g
        lse = tl.load(part_lse_ptr + seq64 * stride_ls + head * stride_lh + offs_s, mask=split_mask,
                      other=float("-inf"), cache_modifier=".cg")
        w = tl.exp2(lse - tl.max(lse, 0))
        part = tl.load(part_out_ptr + seq64 * stride_ps + head * stride_ph + offs_s[:, None] * HEAD_DIM
                       + offs_d[None, :], mask=split_mask[:, None], other=0.0, cache_modifier=".cg")
        out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
        tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _prefetch_rows_l2(rows, row_bytes):
    """One `cp.async.bulk.prefetch.L2` per element of `rows` (pointers, 16-byte aligned) of `row_bytes` each (a
    multiple of 16; 0 asks nothing). Returns nothing to the program: no data of the kernel ahead is read."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [rows, row_bytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_segment_l2(
    k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, seq, kv_head, split, num_splits,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, MIN_TILES: tl.constexpr, ROW_BYTES: tl.constexpr,
    PREFETCH_KEYS: tl.constexpr,
):
    """Before the PDL wait: L2 prefetches of the K and V rows of this program's first PREFETCH_KEYS keys. It reads
    only the lengths and the block table, which the host copied in before the step (`ember.kernels.pdl`); the
    newest key's row, which the kernel ahead may still be writing, is among those asked for, harmlessly."""
    q_len = tl.load(query_start_loc_ptr + seq + 1) - tl.load(query_start_loc_ptr + seq)
    seq_len = tl.load(seq_lens_ptr + seq)
    seg_len = _segment_len(seq_len, num_splits, TILE_N, MIN_TILES)
    kv_start = split * seg_len
    kv_end = tl.minimum(tl.minimum(kv_start + seg_len, seq_len), kv_start + PREFETCH_KEYS)
    kpos = kv_start + tl.arange(0, PREFETCH_KEYS)
    kmask = (kpos < kv_end) & (q_len > 0)
    block = tl.load(block_tables_ptr + seq.to(tl.int64) * stride_bt + kpos // BLOCK_SIZE, mask=kmask,
                    other=0).to(tl.int64)
    in_block = kpos % BLOCK_SIZE
    size = tl.where(kmask, ROW_BYTES, 0)
    _prefetch_rows_l2(k_cache_ptr + block * stride_kb + in_block * stride_ks + kv_head * stride_kh, size)
    _prefetch_rows_l2(v_cache_ptr + block * stride_vb + in_block * stride_vs + kv_head * stride_vh, size)


@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _split_kv_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr, counters_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale_log2e, num_splits,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    stride_ps, stride_ph, stride_ls, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, SPLITS_P: tl.constexpr, TILE_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr, RELEASE_EARLY: tl.constexpr, ROW_BYTES: tl.constexpr, PREFETCH_KEYS: tl.constexpr,
    MIN_TILES: tl.constexpr, TABLE_BEFORE_WAIT: tl.constexpr,
):
    pdl_release_early(USE_PDL, RELEASE_EARLY)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if PREFETCH_KEYS > 0:
        _prefetch_segment_l2(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, seq,
                             kv_head, split, num_splits, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                             stride_vh, stride_bt, BLOCK_SIZE, TILE_N, MIN_TILES, ROW_BYTES, PREFETCH_KEYS)
    if not TABLE_BEFORE_WAIT:
        pdl_wait(USE_PDL)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    seg_len = _segment_len(seq_len, num_splits, TILE_N, MIN_TILES)
    # The splits with keys: short contexts leave the trailing ones empty (seg_len is at least MIN_TILES tiles).
    active = tl.cdiv(seq_len, tl.maximum(seg_len, 1))
    kv_start = split * seg_len
    # Split 0 of an empty context (seq_len 0, q_len 1) still runs, to write zeros as the unified kernel does.
    if (q_len == 0) | ((split > 0) & (split >= active)):
        return
    kv_end = tl.minimum(kv_start + seg_len, seq_len)
    kv_full = kv_start + (kv_end - kv_start) // TILE_N * TILE_N
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    if TABLE_BEFORE_WAIT:
        # The lengths and the block table are host copies (`ember.kernels.pdl`): read while the kernel ahead
        # finishes, so that after the wait the first tile has only q (an L2 hit: the kernel ahead just wrote it),
        # then its K and V to load.
        first_keys = kv_start + tl.arange(0, TILE_N)
        first_block = tl.load(block_table_ptr + first_keys // BLOCK_SIZE, mask=first_keys < kv_end, other=0)
        pdl_wait(USE_PDL)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    head = kv_head * GROUP + offs_m
    row_mask = offs_m < GROUP
    token = q_start.to(tl.int64)
    q = tl.load(q_ptr + token * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask[:, None], other=0.0)
    q_pos = tl.full([BLOCK_M], 0, dtype=tl.int32) + (seq_len - 1)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    rest_from = kv_start
    if TABLE_BEFORE_WAIT:
        # A loop of one iteration (none for an empty context), for the software pipeliner: it issues the copies
        # of K and V together, one round trip for both (outside a loop V's load would wait for K's data). Two
        # stages: one buffer, whatever the kernel's stages (more would add buffers to those of the loops below).
        for start in tl.range(kv_start, tl.minimum(kv_start + TILE_N, kv_end), TILE_N, num_stages=2):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, first_block, kv_head, start, kv_end, q_pos,
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale_log2e,
                True, BLOCK_SIZE, HEAD_DIM, TILE_N, DOT_PRECISION)
        rest_from = kv_start + TILE_N  # past kv_end for a one-tile segment: both loops below are then empty
    tail_from = tl.maximum(kv_full, rest_from) if TABLE_BEFORE_WAIT else kv_full
    acc, m_i, l_i = _attend_kv_range(
        q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head, rest_from, kv_full, q_pos,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale_log2e,
        False, BLOCK_SIZE, HEAD_DIM, TILE_N, DOT_PRECISION)
    acc, m_i, l_i = _attend_kv_range(
        q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head, tail_from, kv_end, q_pos,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale_log2e,
        True, BLOCK_SIZE, HEAD_DIM, TILE_N, DOT_PRECISION)

    pdl_release_late(USE_PDL, RELEASE_EARLY)
    if active <= 1:
        # The whole context is this segment: the result is final. l_i is 0 only for an empty context.
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(out_ptr + token * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
    else:
        # The segment is non-empty and every row sees all of it, so l_i > 0.
        seq64 = seq.to(tl.int64)
        part_off = seq64 * stride_ps + head * stride_ph + split * HEAD_DIM
        tl.store(part_out_ptr + part_off[:, None] + offs_d[None, :], acc / l_i[:, None], mask=row_mask[:, None])
        tl.store(part_lse_ptr + seq64 * stride_ls + head * stride_lh + split, m_i + tl.log2(l_i), mask=row_mask)
        # The pattern of a grid barrier: the CTA barrier orders every thread's partial stores before the one
        # thread that does the atomic, whose release (gpu scope, cumulative) publishes them; the last arrival's
        # acquire makes all the partials visible to it, and Triton hands a scalar atomic's result to the other
        # threads through shared memory behind another CTA barrier, so their loads come after the acquire too.
        tl.debug_barrier()
        counter = counters_ptr + seq * tl.num_programs(1) + kv_head
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == active - 1:
            _merge_splits(part_out_ptr, part_lse_ptr, out_ptr, seq64, token, kv_head, active,
                          stride_ps, stride_ph, stride_ls, stride_lh, stride_ot, stride_oh,
                          GROUP, HEAD_DIM, SPLITS_P)
            # Every active split has arrived, so nothing else touches the counter in this launch; the kernel
            # boundary orders this reset before the next launch or graph replay.
            tl.store(counter, 0)


def default_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits for a decode batch: 1 (unified kernel) once one program per (sequence, KV head) fills the SMs.

    Depends on the batch shape only, never on the context lengths, so a captured decode graph stays valid as
    the sequences grow.
    """
    programs = num_seqs * num_kv_heads
    sms = sm_count(device)
    if programs >= sms:
        return 1
    # About one wave of programs. Measured on an H200 while the merge was still a second launch (Llama-3.1-8B
    # shapes, 4k context, CUDA-graph replays):
    # batch 1 is fastest at 16-32 splits (18.6 us vs 81.5 unified), batch 8 at 4 (51 us vs 90 unified, 55 at 8),
    # and batch 64 (512 programs) is faster unified (260 us vs 276 at 4 splits).
    return min(MAX_SPLITS, triton.next_power_of_2(triton.cdiv(sms, programs)))


def _dot_precision(dtype: torch.dtype) -> str:
    # Triton's default fp32 dot is tf32 (~3e-4 relative error); fp32 is the accuracy path, so keep it exact.
    return "ieee" if dtype == torch.float32 else "tf32"


def _tile_n(q: torch.Tensor, k_cache: torch.Tensor, cap: int) -> int:
    # K and V tiles of up to 32 KiB each: decode streams K/V, and the software pipeliner keeps one tile of each
    # in flight, so the tile size sets the bytes in flight (H200, bf16, head_dim 128: 128 keys beat 64 by 6-22%
    # in most decode cases measured, the unified kernel at batch 64 and 256 included).
    elt = max(q.element_size(), k_cache.element_size())
    return max(16, min(cap, 32768 // (q.shape[-1] * elt)))


def _scatter_stride(slots: int) -> int:
    """A stride coprime with `slots` near its golden section: `i * stride % slots` visits every slot once, with
    consecutive i far apart."""
    stride = max(1, round(slots * 0.618))
    while math.gcd(stride, slots) != 1:
        stride += 1
    return stride


def _shapes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            query_start_loc: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(num_heads, head_dim, num_kv_heads, num_seqs) after checking what the kernels assume; None for an
    empty batch (nothing to launch)."""
    num_tokens, num_heads, head_dim = q.shape
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of 2, at least 16"
    block_size = k_cache.shape[1]
    assert block_size & (block_size - 1) == 0, "block_size must be a power of 2"
    assert num_heads % k_cache.shape[2] == 0, "num_heads must be a multiple of num_kv_heads"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    num_seqs = query_start_loc.shape[0] - 1
    if num_tokens == 0 or num_seqs == 0:
        return None
    return num_heads, head_dim, k_cache.shape[2], num_seqs


def unified_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                      max_query_len: int, scale: float, *, block_m: int | None = None,
                      tile_n: int | None = None, num_warps: int = 4,
                      num_stages: int | None = None, scatter: bool | None = None) -> torch.Tensor:
    """Causal paged attention of a mixed batch into `out`: a program per (sequence, query tile, KV head).

    `block_m` (rows per tile), `tile_n` (keys per step), `num_warps` and `num_stages` override the defaults,
    for benchmarks; so does `scatter` (default `SCATTER_TILES`: tiles taken in a scattered order where the batch
    has prefill chunks).
    """
    shapes = _shapes(q, k_cache, v_cache, query_start_loc)
    if shapes is None:
        return out
    num_heads, head_dim, num_kv_heads, num_seqs = shapes
    num_tokens = q.shape[0]
    group = num_heads // num_kv_heads
    # Rows of one tile: at least 16 (the smallest tensor-core M), 64 when chunks have the queries to fill it.
    # Exact fp32 dots run on FMA units, whose operands then live in registers: 64 rows would spill.
    if block_m is None:
        block_m = max(16, triton.next_power_of_2(group))
        if max_query_len > 1 and q.dtype != torch.float32:
            block_m = max(block_m, min(64, triton.next_power_of_2(max_query_len * group)))
    assert block_m >= group and block_m & (block_m - 1) == 0
    block_q = block_m // group
    # Decode tiles are mostly bandwidth; prefill tiles also hold a [block_m, tile_n] score tile in registers.
    tile_n = tile_n or _tile_n(q, k_cache, 128 if max_query_len == 1 else 64)
    if num_stages is None:
        # The pipeliner keeps one decode tile in flight either way; a third stage helped prefill on an H200
        # (512-token chunk after a 3.5k prefix: 111 us vs 122, one measurement each).
        num_stages = 2 if max_query_len == 1 else 3
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    # Only a batch of prefill chunks has tiles of two kinds to mix.
    scatter = (SCATTER_TILES if scatter is None else scatter) and max_query_len > 1
    _unified_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        scale * _LOG2E, num_seqs, _scatter_stride(grid[0]) if scatter else 1,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m, BLOCK_Q=block_q, TILE_N=tile_n, DOT_PRECISION=_dot_precision(q.dtype), SCATTER=scatter,
        num_warps=num_warps, num_stages=num_stages, **pdl_launch_args(q.device),
    )
    return out


def _rows_16_byte_aligned(*caches: torch.Tensor) -> bool:
    """Whether every [head_dim] row of the caches starts on a 16-byte boundary and is a multiple of 16 bytes."""
    return all(c.data_ptr() % 16 == 0 and all(c.stride(i) * c.element_size() % 16 == 0 for i in range(3))
               and c.shape[-1] * c.element_size() % 16 == 0 for c in caches)


def split_kv_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              out: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                              query_start_loc: torch.Tensor, scale: float, num_splits: int, *,
                              counters: torch.Tensor | None = None, tile_n: int | None = None,
                              min_tiles: int | None = None, num_warps: int | None = None,
                              num_stages: int | None = None,
                              prefetch: bool | None = None, table_before_wait: bool | None = None) -> torch.Tensor:
    """Flash-decoding over `num_splits` context segments for a batch where every q_len is 0 or 1.

    `counters`: int32, at least `num_seqs * num_kv_heads` zeros, which every launch leaves zero again, so one
    buffer serves every launch and CUDA-graph replay (but not two launches running at once). Without one large
    enough, a zeroed buffer is allocated for this call (a memset more). `tile_n` (keys per step), `min_tiles`
    (the fewest tiles in a split), `num_warps` and `num_stages` override the defaults (`SPLIT_KV_SHAPE`), for
    benchmarks. `prefetch` (default `PREFETCH_BEFORE_WAIT`): L2 prefetches before the PDL wait, where PDL is on.
    `table_before_wait` (default `TABLE_BEFORE_WAIT`): the lengths and the first tile's block-table entries are read
    before the PDL wait (without PDL the same code, in the same order, with no wait).
    """
    shapes = _shapes(q, k_cache, v_cache, query_start_loc)
    if shapes is None:
        return out
    num_heads, head_dim, num_kv_heads, num_seqs = shapes
    group = num_heads // num_kv_heads
    assert 1 <= num_splits <= MAX_SPLITS
    shape_keys, shape_min_tiles, shape_warps, shape_stages = SPLIT_KV_SHAPE
    tile_n = tile_n or shape_keys or _tile_n(q, k_cache, 128)
    min_tiles = min_tiles or shape_min_tiles
    num_warps = num_warps or shape_warps
    num_stages = num_stages or shape_stages
    # Partials in fp32: [seq, head, split, dim] and the log2-sum-exp of each split's scores.
    part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    if counters is None or counters.numel() < num_seqs * num_kv_heads:
        counters = torch.zeros(num_seqs * num_kv_heads, dtype=torch.int32, device=q.device)
    assert counters.dtype == torch.int32 and counters.is_contiguous() and counters.device == q.device
    row_bytes = head_dim * k_cache.element_size()
    if prefetch is None:
        prefetch = PREFETCH_BEFORE_WAIT
    # Before the wait there is only something to win under PDL; the bulk prefetch takes 16-byte aligned rows.
    prefetch_keys = 2 * tile_n if prefetch and use_pdl(q.device) and _rows_16_byte_aligned(k_cache, v_cache) else 0
    _split_kv_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_out, part_lse, counters, block_tables, seq_lens, query_start_loc,
        scale * _LOG2E, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        part_out.stride(0), part_out.stride(1), part_lse.stride(0), part_lse.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=max(16, triton.next_power_of_2(group)), SPLITS_P=triton.next_power_of_2(num_splits),
        TILE_N=tile_n, DOT_PRECISION=_dot_precision(q.dtype), ROW_BYTES=row_bytes, PREFETCH_KEYS=prefetch_keys,
        MIN_TILES=min_tiles, TABLE_BEFORE_WAIT=TABLE_BEFORE_WAIT if table_before_wait is None else table_before_wait,
        num_warps=num_warps, num_stages=num_stages,
        **pdl_small_kernel_args(q.device, num_seqs * num_kv_heads * num_splits),
    )
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int, scale: float,
                    out: torch.Tensor | None = None, num_splits: int | None = None,
                    counters: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its paged context: `[num_tokens, heads, dim]`.

    Decode-only batches (`max_query_len <= 1`) take the split-KV path when `num_splits` (default: from the
    batch shape and SM count) is above 1; everything else takes the unified kernel. `counters`: the split-KV
    path's arrival counters (see `split_kv_decode_attention`).
    """
    if out is None:
        out = torch.empty_like(q)
    if max_query_len <= 1:
        if num_splits is None:
            num_splits = default_num_splits(query_start_loc.shape[0] - 1, k_cache.shape[2], q.device)
        if num_splits > 1:
            return split_kv_decode_attention(q, k_cache, v_cache, out, block_tables, seq_lens,
                                             query_start_loc, scale, num_splits, counters=counters)
    return unified_attention(q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, max_query_len,
                             scale)
