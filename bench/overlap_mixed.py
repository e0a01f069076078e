"""Whether a mixed step pays to run its decodes and its prefill chunks side by side, on two CUDA streams.

    python bench/overlap_mixed.py [llama-3.1-8b-instruct] --tokenizer DIR [--decodes 245 --decode-context 1088
                                  --chunks 1024 1024 1024 1024 700] [--json F]

In a mixed step the decodes' attention reads their whole contexts' K/V (bound by bandwidth) while the tensor
cores idle, and the products of the prefill chunks (bound by the tensor cores) run before and after it: the
offline run's ~18 TB of K/V reads add to its matmul time instead of hiding under it (docs/PERFORMANCE.md,
sixteenth session). This times one whole forward of the model (dummy weights, the engine's own model, cache and
kernels) on such a batch, the decodes' logits included:
- mixed: one batch, as the engine runs it now;
- split, serial: the decodes and the chunks as two forwards one after the other (each reads all the weights);
- split, two streams: the same two forwards queued on two streams, the decodes' on the higher-priority one;
- graph + chunks: the decodes by the engine's decode CUDA graph on the side stream, the chunks eagerly;
beside the step's compute floor (FLOPs over the matmul rate measured now) and that floor plus the decodes' K/V
bytes over the copy rate (what a step that overlaps nothing can reach at best). The decodes' logits of the two
stream variants must equal the serial ones bit for bit (they run the same kernels on the same inputs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from ember.bench.roofline import (  # noqa: E402
    attention_flops,
    kv_bytes_per_token,
    matmul_flops_per_token,
    measure,
    median_seconds,
)
from ember.config import EngineConfig  # noqa: E402
from ember.engine.cuda_graphs import DecodeBatch  # noqa: E402
from ember.engine.llm_engine import LLMEngine  # noqa: E402
from ember.engine.model_runner import HostBatch, StepInputs, cache_slot  # noqa: E402


def host_batch(q_lens: list[int], contexts: list[int], blocks: Iterator[int], block_size: int, vocab: int,
               gen: torch.Generator) -> HostBatch:
    """Sequences of `q_lens` new tokens after `contexts` cached ones, on fresh blocks; each samples its last row."""
    b = HostBatch([], [], [], [0], [], [], [], [])
    tables = []
    for q, c in zip(q_lens, contexts, strict=True):
        table = [next(blocks) for _ in range(-(-(q + c) // block_size))]
        b.logits_indices.append(len(b.input_ids) + q - 1)
        b.input_ids.extend(torch.randint(vocab, (q,), generator=gen).tolist())
        b.positions.extend(range(c, c + q))
        b.slots.extend(cache_slot(table, p, block_size) for p in range(c, c + q))
        b.query_start_loc.append(b.query_start_loc[-1] + q)
        b.query_lens.append(q)
        b.seq_lens.append(c + q)
        tables.append(table)
    width = max(len(t) for t in tables)
    b.block_tables = [t + [0] * (width - len(t)) for t in tables]
    return b


def joined(first: HostBatch, second: HostBatch) -> HostBatch:
    """One batch of both (first's sequences first, as the scheduler lists decodes before chunks)."""
    width = max(len(first.block_tables[0]), len(second.block_tables[0]))
    rows = len(first.input_ids)
    return HostBatch(first.input_ids + second.input_ids, first.positions + second.positions,
                     first.slots + second.slots,
                     first.query_start_loc + [rows + s for s in second.query_start_loc[1:]],
                     first.query_lens + second.query_lens, first.seq_lens + second.seq_lens,
                     [t + [0] * (width - len(t)) for t in first.block_tables + second.block_tables],
                     first.logits_indices + [rows + i for i in second.logits_indices])


def fill_cache(kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Contexts of finite values (the cache starts uninitialised)."""
    for k_cache, v_cache in kv_caches:
        k_cache.normal_(0, 0.5)
        v_cache.normal_(0, 0.5)


def sampled_logits(eng: LLMEngine, inp: StepInputs, rows: slice | None = None) -> torch.Tensor:
    """One eager forward of `inp`, then the logits of its sampling rows (`rows` of them, if given)."""
    hidden = eng.model(inp.input_ids, inp.positions, eng.runner.kv_caches, inp.meta, eng.runner.attn)
    idx = inp.logits_indices if rows is None else inp.logits_indices[rows]
    return eng.model.compute_logits(hidden.index_select(0, idx))


def run(eng: LLMEngine, args: argparse.Namespace) -> None:
    n_dec = args.decodes
    runner, arch = eng.runner, eng.arch
    fill_cache(runner.kv_caches)
    gen = torch.Generator().manual_seed(0)
    blocks = iter(range(1, runner.kv_caches[0][0].shape[0]))
    bs, vocab = runner.block_size, arch.vocab_size
    dec = host_batch([1] * n_dec, [args.decode_context] * n_dec, blocks, bs, vocab, gen)
    pre = host_batch(args.chunks, [0] * len(args.chunks), blocks, bs, vocab, gen)
    mix = joined(dec, pre)
    inputs = {name: runner.device_inputs(b) for name, b in (("dec", dec), ("pre", pre), ("mix", mix))}

    main_stream = torch.cuda.current_stream()
    side = torch.cuda.Stream(priority=-100)  # lower is higher; out of range maps to the highest the device has

    def mixed() -> torch.Tensor:
        return sampled_logits(eng, inputs["mix"], slice(0, n_dec))

    def serial() -> torch.Tensor:
        out = sampled_logits(eng, inputs["dec"])
        sampled_logits(eng, inputs["pre"])
        return out

    def beside_the_chunks(decodes: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """`decodes` queued on the side stream, the chunks' forward on the main one."""
        def fn() -> torch.Tensor:
            side.wait_stream(main_stream)
            with torch.cuda.stream(side):
                out = decodes()
            sampled_logits(eng, inputs["pre"])
            main_stream.wait_stream(side)
            return out
        return fn

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "mixed": mixed, "split, serial": serial,
        "split, two streams": beside_the_chunks(lambda: sampled_logits(eng, inputs["dec"]))}
    graphs = runner.graphs
    if graphs is not None and n_dec <= graphs.max_batch:
        graph_batch = DecodeBatch(dec.input_ids, dec.positions, dec.slots, dec.seq_lens,
                                  [t[:-(-s // bs)] for t, s in zip(dec.block_tables, dec.seq_lens, strict=True)])
        variants["graph + chunks"] = beside_the_chunks(lambda: graphs.run(graph_batch))
    logits = {name: fn().float().clone() for name, fn in variants.items()}
    torch.cuda.synchronize()
    agree = {name: {"max_abs_diff_vs_serial": (lg - logits["split, serial"]).abs().max().item(),
                    "argmax_equal_to_serial": bool(torch.equal(lg.argmax(-1), logits["split, serial"].argmax(-1)))}
             for name, lg in logits.items()}

    roof = measure(eng.device, eng.dtype)
    new_tokens = n_dec + sum(args.chunks)
    flops = (matmul_flops_per_token(arch) * new_tokens
             + attention_flops(arch, n_dec, args.decode_context + 1)
             + sum(attention_flops(arch, c, (c + 1) / 2) for c in args.chunks))
    compute_ms = flops / roof.matmul_rate * 1e3
    kv_ms = n_dec * (args.decode_context + 1) * kv_bytes_per_token(arch, eng.dtype) / roof.bandwidth * 1e3
    print(f"{torch.cuda.get_device_name()}: {n_dec} decodes at {args.decode_context} + chunks {args.chunks}; "
          f"matmul {roof.matmul_rate / 1e12:.0f} TFLOP/s, copy {roof.bandwidth / 1e9:,.0f} GB/s")
    print(f"compute floor {compute_ms:.2f} ms; + the decodes' K/V at the copy rate {compute_ms + kv_ms:.2f} ms")
    # Two rounds, alternating, so a drifting clock shows as a spread rather than as a difference.
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _, (name, fn) in itertools.product(range(2), variants.items()):
        timings[name].append(median_seconds(fn, eng.device, args.reps) * 1e3)
    for name, ts in timings.items():
        best = min(ts)
        print(f"{name:20s} {' '.join(f'{t:8.2f}' for t in ts)} ms  ({compute_ms / best * 100:5.1f} % of the compute "
              f"floor)  logits vs serial: max diff {agree[name]['max_abs_diff_vs_serial']:.3g}, argmax "
              f"{'equal' if agree[name]['argmax_equal_to_serial'] else 'DIFFERENT'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args),
                       "matmul_tflop_s": roof.matmul_rate / 1e12, "copy_gb_s": roof.bandwidth / 1e9,
                       "compute_floor_ms": compute_ms, "decode_kv_ms": kv_ms, "timings_ms": timings,
                       "logits": agree}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="llama-3.1-8b-instruct")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--decodes", type=int, default=245)
    ap.add_argument("--decode-context", type=int, default=1088)
    ap.add_argument("--chunks", type=int, nargs="+", default=[1024, 1024, 1024, 1024, 700])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n_dec = args.decodes
    eng = LLMEngine(EngineConfig(model=args.model, load_format="dummy", tokenizer=args.tokenizer, max_model_len=4096,
                                 max_num_seqs=max(n_dec, 1)))
    with torch.inference_mode():
        run(eng, args)
    eng.close()


if __name__ == "__main__":
    main()
