"""Time the Triton paged-attention kernels and compare decode with the measured HBM bandwidth.

Run on a GPU from the repository root: `python3 bench/attention_kernels.py` (`--help` for the shapes).

Decode is memory-bound: every step reads each sequence's whole K/V once. The floor is those bytes over the
bandwidth of a large device-to-device copy measured in the same run (bytes read + bytes written). Times are
`triton.testing.do_bench` medians, which clear the L2 cache before every call, so small cases measure HBM
rather than the cache. Decode is timed as the engine runs it, replayed from a CUDA graph: eager launches from
Python cost tens of microseconds, more than the kernels themselves at small batch (one eager column shows it).
Prefill rows compare the unified kernel with torch SDPA (FlashAttention backend where torch picks it) on the
same dense causal problem.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from ember.attention.backend import AttentionMetadata  # noqa: E402
from ember.attention.torch_ref import paged_attention_ref  # noqa: E402
from ember.bench.profiling import capture_graph  # noqa: E402
from ember.kernels.paged_attention import (  # noqa: E402
    default_num_splits,
    paged_attention,
    split_kv_decode_attention,
    unified_attention,
)

DTYPE = torch.bfloat16
# (keys per step, warps, pipeline stages, fewest tiles in a split: split-KV only, `EMBER_ATTN_SPLIT_KV`)
# (From 5 stages Triton 3.6 double-buffers K/V in these loops: tests/attention/test_split_kv_variants.py.)
TILE_SHAPES = [(64, 4, 3, 2), (128, 4, 2, 2), (128, 8, 2, 2), (256, 8, 2, 2), (128, 4, 2, 1), (256, 8, 2, 1),
               (256, 4, 2, 1), (64, 4, 5, 2), (128, 4, 5, 2)]
PREFILL = [(0, 1024), (0, 4096), (3584, 512)]  # (cached prefix, chunk)
# (rows per tile, keys per step, warps, stages) tried besides the default for prefill
PREFILL_TILES = [(64, 64, 4, 3), (128, 64, 8, 2)]


def median_ms(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def graph_ms(fn: Callable[[], object]) -> float:
    """Median time of `fn` replayed from a CUDA graph (launch cost ~ that of the engine's decode graphs)."""
    return median_ms(capture_graph(fn).replay)


def copy_bandwidth_gbs() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    src = torch.randn(2**29, dtype=DTYPE, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm()).item()


class DecodeCase:
    """`batch` decodes of `context` tokens each over a block-shuffled bf16 cache."""

    def __init__(self, args: argparse.Namespace, batch: int, context: int) -> None:
        kvh, d, bs = args.kv_heads, args.head_dim, args.block_size
        blocks_per_seq = -(-context // bs)
        num_blocks = batch * blocks_per_seq
        self.k_cache = torch.randn(num_blocks, bs, kvh, d, dtype=DTYPE, device="cuda")
        self.v_cache = torch.randn_like(self.k_cache)
        perm = torch.randperm(num_blocks, device="cuda")
        self.block_tables = perm.to(torch.int32).view(batch, blocks_per_seq)
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        self.qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        self.q = torch.randn(batch, args.heads, d, dtype=DTYPE, device="cuda")
        self.scale = d ** -0.5
        # Split-KV arrival counters kept across calls, as TritonAttention does (without, each call adds a memset).
        self.counters = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
        # The fewest bytes a step must move: all K/V once, q in, out back, the block table.
        kv = 2 * batch * context * kvh * d * self.k_cache.element_size()
        self.bytes = kv + 2 * self.q.numel() * self.q.element_size() + self.block_tables.numel() * 4

    def _args(self) -> tuple[torch.Tensor, ...]:
        out = torch.empty_like(self.q)
        return self.q, self.k_cache, self.v_cache, out, self.block_tables, self.seq_lens, self.qsl

    def auto(self) -> torch.Tensor:
        return paged_attention(self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.qsl,
                               1, self.scale, counters=self.counters)

    def unified(self, **cfg: int) -> torch.Tensor:
        return unified_attention(*self._args(), 1, self.scale, **cfg)

    def split(self, num_splits: int, **cfg: int) -> torch.Tensor:
        return split_kv_decode_attention(*self._args(), self.scale, num_splits, counters=self.counters, **cfg)

    def reference_head(self, n: int) -> torch.Tensor:
        """The torch reference on the first `n` sequences (the whole batch is too slow to loop over)."""
        n = min(n, self.q.shape[0])
        lens = self.seq_lens[:n].tolist()
        # Only those sequences' pages, upcast and renumbered.
        pages = self.block_tables[:n].flatten().long()
        tables = torch.arange(pages.numel(), dtype=torch.int32, device="cuda").view(n, -1)
        meta = AttentionMetadata(torch.empty(0), self.qsl[: n + 1], self.seq_lens[:n], tables, 1, max(lens),
                                 [1] * n, lens)
        kc, vc = self.k_cache[pages].float(), self.v_cache[pages].float()
        return paged_attention_ref(self.q[:n].float(), kc, vc, meta, self.scale)


def decode_row(args: argparse.Namespace, batch: int, context: int, copy_gbs: float, sms: int) -> list[str]:
    case = DecodeCase(args, batch, context)
    auto_splits = default_num_splits(batch, args.kv_heads, case.q.device)
    ref = case.reference_head(4)
    variants: dict[str, Callable[[], torch.Tensor]] = {"unified": case.unified, "auto": case.auto}
    if batch * args.kv_heads < 4 * sms:
        for s in args.splits:
            variants[f"split{s}"] = functools.partial(case.split, s)
    timed: dict[str, float] = {}
    errs = []
    for name, fn in variants.items():
        errs.append(rel_err(fn()[: ref.shape[0]], ref))
        timed[name] = graph_ms(fn)
    eager = median_ms(case.auto)
    print(f"decode batch {batch} ctx {context}: "
          + ", ".join(f"{k} {v * 1e3:.1f} us" for k, v in timed.items()) + f", auto eager {eager * 1e3:.1f} us",
          flush=True)
    gbs = {k: case.bytes / v / 1e6 for k, v in timed.items()}
    splits = [k for k in timed if k.startswith("split")]
    best_split = min(splits, key=timed.__getitem__) if splits else None
    return [
        str(batch), str(context), f"{case.bytes / 1e6:.1f}", f"{case.bytes / copy_gbs / 1e3:.1f}",
        f"{timed['unified'] * 1e3:.1f}", f"{gbs['unified']:.0f}",
        f"{timed[best_split] * 1e3:.1f} ({best_split})" if best_split else "-",
        str(auto_splits), f"{timed['auto'] * 1e3:.1f}", f"{gbs['auto']:.0f}",
        f"{100 * gbs['auto'] / copy_gbs:.0f}%", f"{eager * 1e3:.1f}",
        min(timed, key=timed.__getitem__), f"{max(errs):.1e}",
    ]


def tile_rows(args: argparse.Namespace, batch: int, context: int, sms: int) -> list[list[str]]:
    """Graph-replay time (us) of each decode tile shape, for the unified kernel and each split count."""
    case = DecodeCase(args, batch, context)
    split_counts = [1] + (args.splits if batch * args.kv_heads < 4 * sms else [])
    rows = []
    for splits in split_counts:
        row = [str(batch), str(context), str(splits)]
        for tile_n, warps, stages, min_tiles in TILE_SHAPES:
            cfg = dict(tile_n=tile_n, num_warps=warps, num_stages=stages)
            if splits > 1:
                fn = functools.partial(case.split, splits, min_tiles=min_tiles, **cfg)
            elif min_tiles != 2:  # the unified kernel has no splits: the same as the shape without it
                row.append("-")
                continue
            else:
                fn = functools.partial(case.unified, **cfg)
            try:
                row.append(f"{graph_ms(fn) * 1e3:.1f}")
            except Exception as e:  # an over-large tile runs out of shared memory: report it and go on
                row.append(type(e).__name__)
        rows.append(row)
        print("tiles " + " ".join(row), flush=True)
    return rows


def prefill_row(args: argparse.Namespace, prefix: int, q_len: int) -> list[str]:
    """One prompt chunk of `q_len` tokens after a cached prefix, against SDPA on the same dense problem."""
    h, kvh, d, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    seq_len = prefix + q_len
    n_blocks = -(-seq_len // bs)
    k_cache = torch.randn(n_blocks, bs, kvh, d, dtype=DTYPE, device="cuda")
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.randperm(n_blocks, device="cuda").to(torch.int32).view(1, n_blocks)
    seq_lens = torch.tensor([seq_len], dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0, q_len], dtype=torch.int32, device="cuda")
    q = torch.randn(q_len, h, d, dtype=DTYPE, device="cuda")
    scale = d ** -0.5
    # The same keys in logical order, dense, for SDPA; an explicit mask when the queries are offset.
    pages = block_tables[0].long()
    k = k_cache[pages].reshape(-1, kvh, d)[:seq_len].transpose(0, 1).unsqueeze(0)
    v = v_cache[pages].reshape(-1, kvh, d)[:seq_len].transpose(0, 1).unsqueeze(0)
    qd = q.transpose(0, 1).unsqueeze(0)
    mask = None if prefix == 0 else torch.ones(q_len, seq_len, dtype=torch.bool, device="cuda").tril(prefix)

    def ours() -> torch.Tensor:
        return paged_attention(q, k_cache, v_cache, block_tables, seq_lens, qsl, q_len, scale)

    def tiled(block_m: int, tile_n: int, warps: int, stages: int) -> torch.Tensor:
        return unified_attention(q, k_cache, v_cache, torch.empty_like(q), block_tables, seq_lens, qsl, q_len,
                                 scale, block_m=block_m, tile_n=tile_n, num_warps=warps, num_stages=stages)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(qd, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=True)

    err = rel_err(ours(), sdpa().squeeze(0).transpose(0, 1))
    t_ours, t_sdpa = median_ms(ours), median_ms(sdpa)
    t_tiles = {}
    for shape in PREFILL_TILES:
        try:
            t_tiles["/".join(map(str, shape))] = median_ms(functools.partial(tiled, *shape))
        except Exception as e:  # out of shared memory: report it and go on
            print(f"prefill tile {shape}: {type(e).__name__}")
    best = min(t_tiles, key=t_tiles.__getitem__) if t_tiles else None
    # Causal FLOPs: QK^T and PV over the visible (query, key) pairs; FLOP / ms / 1e9 is TFLOP/s.
    flops = 4 * (q_len * prefix + q_len * (q_len + 1) / 2) * h * d
    print(f"prefill prefix {prefix} chunk {q_len}: ours {t_ours * 1e3:.0f} us, sdpa {t_sdpa * 1e3:.0f} us",
          flush=True)
    return [str(prefix), str(q_len), f"{t_ours * 1e3:.0f}", f"{flops / t_ours / 1e9:.0f}",
            f"{t_tiles[best] * 1e3:.0f} ({best})" if best else "-", f"{t_sdpa * 1e3:.0f}",
            f"{flops / t_sdpa / 1e9:.0f}", f"{err:.1e}"]


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--splits", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-tiles", action="store_true", help="skip the tile-shape sweep")
    p.add_argument("--no-prefill", action="store_true", help="skip the prefill rows")
    args = p.parse_args()

    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    copy_gbs = copy_bandwidth_gbs()
    print(f"{props.name}, {sms} SMs, torch {torch.__version__}; device copy {copy_gbs:.0f} GB/s "
          f"(read + write, 1 GiB bf16); {args.heads} q heads, {args.kv_heads} kv heads, "
          f"head_dim {args.head_dim}, block {args.block_size}, bf16", flush=True)
    decode = []
    for context in args.contexts:
        for batch in args.batches:
            decode.append(decode_row(args, batch, context, copy_gbs, sms))
            torch.cuda.empty_cache()
    tiles = []
    if not args.no_tiles:
        for batch in args.batches:
            tiles += tile_rows(args, batch, max(args.contexts), sms)
            torch.cuda.empty_cache()
    prefill = [] if args.no_prefill else [prefill_row(args, prefix, n) for prefix, n in PREFILL]

    print(f"\n{props.name}: device copy {copy_gbs:.0f} GB/s. Decode: us, median of CUDA-graph replays "
          "(eager: from Python); GB/s = minimum bytes / time")
    print(table(["batch", "ctx", "MB", "floor us", "unified us", "GB/s", "best split us", "auto splits",
                 "auto us", "auto GB/s", "of copy", "eager us", "fastest", "max rel err"], decode))
    if tiles:
        print("\nDecode tile shapes: graph-replay us per keys per step / warps / stages / fewest tiles in a split "
              "(splits 1: unified)")
        print(table(["batch", "ctx", "splits", *("/".join(map(str, t)) for t in TILE_SHAPES)], tiles))
    if prefill:
        print("\nPrefill, one sequence: us median (eager); TFLOP/s over the visible (query, key) pairs")
        header = ["prefix", "chunk", "unified us", "TFLOP/s", "best tile us (m/n/warps/stages)", "sdpa us",
                  "sdpa TFLOP/s", "rel err"]
        print(table(header, prefill))


if __name__ == "__main__":
    main()
