"""How close ember's residual add + RMSNorm and SiLU·mul kernels run to the copy rate, and which launch shape wins.

    python bench/elementwise.py [--rows 64 512 1024 4096 8192] [--json FILE]

Both ops are memory-bound: add + RMSNorm reads x and the residual and writes the sum and the normalised rows (4
passes over [rows, hidden]); SiLU·mul reads [rows, 2 * inter] and writes [rows, inter]. For each number of rows
it times ember's default launch, the variants swept (rows per program and warps for RMSNorm; block and warps for
SiLU·mul), the torch reference eagerly and compiled by torch.compile, as medians of CUDA-graph replays with the L2
flushed, and prints each one's bytes over its time against the device-copy rate measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from ember.bench.profiling import replay_us  # noqa: E402
from ember.bench.roofline import measure_bandwidth  # noqa: E402
from ember.model.layers import rms_norm_ref, silu_mul_ref  # noqa: E402

EPS = 1e-5


def variants(op: str) -> dict[str, Callable[..., object]]:
    from ember.kernels import fused

    if op == "add_rms_norm":
        out: dict[str, Callable[..., object]] = {"ember": fused.rms_norm}
        for rows, warps in itertools.product((1, 2, 4), (4, 8, 16)):
            out[f"rows{rows}_w{warps}"] = functools.partial(fused.rms_norm, rows_per_program=rows, num_warps=warps)
        out["torch"] = rms_norm_ref
        out["compiled"] = torch.compile(rms_norm_ref, dynamic=False)
        return out
    out = {"ember": fused.silu_mul}
    for block, warps in itertools.product((512, 1024, 2048, 4096), (2, 4, 8)):
        out[f"block{block}_w{warps}"] = functools.partial(fused.silu_mul, block=block, num_warps=warps)
    out["torch"] = silu_mul_ref
    out["compiled"] = torch.compile(silu_mul_ref, dynamic=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 512, 1024, 4096, 8192])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    dtype = torch.bfloat16
    torch.manual_seed(0)
    copy = measure_bandwidth(device)
    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}; device copy {copy / 1e9:.0f} GB/s", flush=True)
    results = []
    weight = torch.rand(args.hidden, device=device, dtype=dtype) + 0.5
    for rows in args.rows:
        x = torch.randn(rows, args.hidden, device=device, dtype=dtype)
        res = torch.randn_like(x)
        gate_up = torch.randn(rows, 2 * args.intermediate, device=device, dtype=dtype)
        cases = {
            "add_rms_norm": ((x, weight, EPS, res), 4 * x.numel() * x.element_size(),
                             rms_norm_ref(x, weight, EPS, res)),
            "silu_mul": ((gate_up,), 3 * rows * args.intermediate * gate_up.element_size(), silu_mul_ref(gate_up)),
        }
        for op, (inputs, nbytes, ref) in cases.items():
            ref_out = ref[0] if isinstance(ref, tuple) else ref
            line = []
            for vname, fn in variants(op).items():
                got = fn(*inputs)
                got = got[0] if isinstance(got, tuple) else got
                err = ((got.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
                us = replay_us(functools.partial(fn, *inputs))
                row = {"rows": rows, "op": op, "variant": vname, "us": us, "bytes": nbytes,
                       "of_copy_rate": nbytes / (us * 1e-6) / copy, "rel_err": err}
                results.append(row)
                line.append(f"{vname} {us:.1f}")
            floor = nbytes / copy * 1e6
            best = min((r for r in results if r["rows"] == rows and r["op"] == op), key=lambda r: r["us"])
            print(f"rows {rows:5d} {op:12s} floor {floor:6.1f} us | best {best['variant']} {best['us']:.1f} us "
                  f"({best['of_copy_rate']:.0%}) | " + ", ".join(line), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "copy_bytes_per_s": copy,
                                               "args": vars(args), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
