"""The `ember bench` subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_bench(sub: Any, add_engine_args: Callable[[argparse.ArgumentParser], None],
              engine_config_from_args: Callable[[argparse.Namespace], Any]) -> None:
    """`add_engine_args` adds the same engine flags `ember serve` takes; `engine_config_from_args` reads them."""
    p = sub.add_parser("bench", help="benchmarks: latency, throughput, serve, hf")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")

    def offline(name: str, help_: str, fn_name: str, **defaults: int) -> None:
        q = bsub.add_parser(name, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_engine_args(q)
        q.add_argument("--input-len", type=int, default=defaults.get("input_len", 32))
        q.add_argument("--output-len", type=int, default=defaults.get("output_len", 128))
        q.add_argument("--batch-size", type=int, default=1)
        q.add_argument("--num-prompts", type=int, default=defaults.get("num_prompts", 0))
        q.add_argument("--iters", type=int, default=3)
        q.add_argument("--output-json", default=None)
        if name != "hf":
            q.add_argument("--freeze-heap", action="store_true",
                           help="freeze the startup heap out of the garbage collector once the engine is built, "
                                "as `ember serve` does")
        if name == "throughput":
            q.add_argument("--sustained-seconds", type=float, default=5.0,
                           help="after the run, time matmuls after this long under load: the roofline at the "
                                "clock a long run holds, reported beside the burst one (0: skip)")

        def run(args: argparse.Namespace) -> int:
            from ember.bench import hf_peer
            from ember.bench import offline as off

            fn = {"latency": off.bench_latency, "throughput": off.bench_throughput, "hf": hf_peer.bench_hf}[fn_name]
            off.print_result(fn(args, engine_config_from_args(args)), args.output_json)
            return 0

        q.set_defaults(handler=run)

    offline("latency", "batch-1 (or --batch-size) decode speed vs the HBM roofline", "latency")
    offline("throughput", "offline: N random prompts, output and total tok/s vs the compute roofline",
            "throughput", num_prompts=1000, input_len=1024, output_len=128)
    offline("hf", "HF transformers peer on the same weights: generate (bs=1) and generate_batch", "hf",
            num_prompts=0, input_len=1024, output_len=128)

    from ember.bench.serve import add_serve_bench

    add_serve_bench(bsub)
