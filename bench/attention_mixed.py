"""Paged attention on a mixed batch like the offline-throughput workload's steady state, and on its two halves.

    python bench/attention_mixed.py [--decodes 245 --decode-context 1088 --chunks 1024 1024 1024 1024 700]
                                    [--kv-cache-dtype fp8] [--no-sweep]

One step of `ember bench throughput` on Llama-3.1-8B (1024 in, 128 out) holds ~245 decodes of ~1.1k-token
contexts and ~4.7k prefill-chunk tokens. The unified kernel runs them in one launch with one tile shape. This
times that launch, then the decodes alone and the prefill chunks alone (each with the shapes given), beside
their floors measured in the same run: the decodes' K/V bytes over a device copy's rate, and the chunks'
attention FLOPs over torch SDPA (FlashAttention) on the same dense causal problem. The mixed launch is also timed
with its tiles taken in a scattered order (`EMBER_ATTN_SCATTER`), so that both kinds run side by side.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from ember.kernels.paged_attention import unified_attention  # noqa: E402

HEADS, KV_HEADS, DIM, BLOCK = 32, 8, 128, 16


def _batch(q_lens: list[int], ctx: list[int], gen: torch.Generator, k_cache: torch.Tensor,
           free: list[int]) -> dict:
    """Sequences with `q_lens` new tokens after `ctx` cached ones (tokens = q_len + ctx each)."""
    tables, seq_lens = [], []
    for q, c in zip(q_lens, ctx, strict=True):
        n = -(-(q + c) // BLOCK)
        tables.append([free.pop() for _ in range(n)])
        seq_lens.append(q + c)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device="cuda")
    q = torch.randn(sum(q_lens), HEADS, DIM, generator=gen).to("cuda", torch.bfloat16)
    return {"q": q, "bt": bt, "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device="cuda"), "qsl": qsl,
            "max_q": max(q_lens), "out": torch.empty_like(q)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decodes", type=int, default=245)
    ap.add_argument("--decode-context", type=int, default=1088)
    ap.add_argument("--chunks", type=int, nargs="+", default=[1024, 1024, 1024, 1024, 700])
    ap.add_argument("--kv-cache-dtype", choices=["bf16", "fp8"], default="bf16",
                    help="the cache's element type (fp8: E4M3, as `--kv-cache-dtype fp8` stores it)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the tile-shape sweeps")
    args = ap.parse_args()
    kv_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    n_dec, chunks = args.decodes, args.chunks
    tokens = n_dec * (args.decode_context + 1) + sum(chunks)
    num_blocks = tokens // BLOCK + 2 * (n_dec + len(chunks)) + 8
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=gen).to("cuda", kv_dtype)
    v_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=gen).to("cuda", kv_dtype)
    perm = torch.randperm(num_blocks - 1, generator=gen).add(1).tolist()
    scale = DIM ** -0.5
    dec_q, dec_c = [1] * n_dec, [args.decode_context] * n_dec
    pre_q, pre_c = chunks, [0] * len(chunks)
    mixed = _batch(dec_q + pre_q, dec_c + pre_c, gen, k_cache, list(perm))
    dec = _batch(dec_q, dec_c, gen, k_cache, list(perm))
    pre = _batch(pre_q, pre_c, gen, k_cache, list(perm))

    def run(b: dict, **cfg: int) -> float:
        def fn() -> None:
            unified_attention(b["q"], k_cache, v_cache, b["out"], b["bt"], b["seq_lens"], b["qsl"], b["max_q"],
                              scale, **cfg)
        return do_bench(fn, warmup=5, rep=40) * 1e3  # us

    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 4 / (do_bench(lambda: dst.copy_(src), rep=40) * 1e-3) / 1e9
    kv_bytes = n_dec * (args.decode_context + 1) * KV_HEADS * DIM * 2 * k_cache.element_size()
    # Dense causal SDPA on the chunks: the FlashAttention peer.
    sd = [(torch.randn(1, HEADS, c, DIM, generator=gen).to("cuda", torch.bfloat16),
           torch.randn(1, HEADS, c, DIM, generator=gen).to("cuda", torch.bfloat16)) for c in chunks]
    t_sdpa = do_bench(lambda: [F.scaled_dot_product_attention(q, k, k, is_causal=True) for q, k in sd],
                      rep=40) * 1e3
    print(f"{args.kv_cache_dtype} cache; copy {copy_gbs:,.0f} GB/s; decodes' K/V {kv_bytes / 1e9:.2f} GB -> floor "
          f"{kv_bytes / copy_gbs / 1e3:.0f} us; prefill chunks {chunks}: SDPA (flash) {t_sdpa:.0f} us")
    print(f"mixed batch, one launch (default shape): {run(mixed, scatter=False):8.0f} us")
    print(f"the same, tiles scattered:              {run(mixed, scatter=True):8.0f} us  (EMBER_ATTN_SCATTER=1)")
    print(f"decodes alone (default shape):          {run(dec):8.0f} us")
    print(f"prefill alone (default shape):          {run(pre):8.0f} us")
    if args.no_sweep:
        return
    for bm, tn, warps, stages in itertools.product((64, 128), (64, 128), (4, 8), (2, 3)):
        try:
            t = run(pre, block_m=bm, tile_n=tn, num_warps=warps, num_stages=stages)
        except Exception as e:  # noqa: BLE001 - a shape the compiler refuses (shared memory)
            print(f"  prefill block_m={bm} tile_n={tn} warps={warps} stages={stages}: {type(e).__name__}")
            continue
        print(f"  prefill block_m={bm:3d} tile_n={tn:3d} warps={warps} stages={stages}: {t:8.0f} us")
    for tn, warps, stages in itertools.product((64, 128, 256), (4, 8), (2, 3)):
        try:
            t = run(dec, tile_n=tn, num_warps=warps, num_stages=stages)
        except Exception as e:  # noqa: BLE001
            print(f"  decode tile_n={tn} warps={warps} stages={stages}: {type(e).__name__}")
            continue
        print(f"  decode tile_n={tn:3d} warps={warps} stages={stages}: {t:8.0f} us "
              f"({kv_bytes / t / 1e3:,.0f} GB/s)")


if __name__ == "__main__":
    main()
