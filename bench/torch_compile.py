"""Would torch.compile pay in ember's forward? Its small ops and products against what inductor makes of them.

    python bench/torch_compile.py [--tokens 1 64 512] [--max-autotune] [--per-op] [--json FILE]

A Llama-3.1-8B layer (hidden 4096, intermediate 14336, 32 q and 8 KV heads of 128) without its attention, at a
given number of tokens a step, three ways: ember's own path (its Triton kernels for residual add + RMSNorm and
SiLU·mul, the batch-1 GEMV or cuBLAS for the products), the torch reference of the same ops compiled by
torch.compile (inductor fuses the elementwise ops into its own Triton kernels and calls cuBLAS for the
products), and, with --max-autotune, that compiled with mode="max-autotune-no-cudagraphs" (inductor also tries
its Triton GEMM templates, with the elementwise ops fused into their epilogues). The whole chain (--per-op:
each op too) is timed as the engine runs a decode step: medians of CUDA-graph replays. Attention is left out:
ember's paged kernels have no torch.compile counterpart short of a different kernel (`bench/attention_kernels.py`).

On a CPU (`--device cpu`, small shapes: `--hidden 256 --intermediate 512`) it checks the script's arithmetic
only; the timings mean nothing there.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ember.model.layers import RMSNorm, rms_norm_ref, silu_mul, silu_mul_ref  # noqa: E402
from ember.model.linear import Linear  # noqa: E402

EPS = 1e-5


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Microseconds per call: CUDA-graph replays timed with triton's do_bench (L2 flushed) on a GPU, a plain
    loop on the CPU."""
    if device.type == "cuda":
        from ember.bench.profiling import replay_us

        return replay_us

    def cpu_us(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e6

    return cpu_us


class Layer:
    """One layer's weights and the ops around its attention, ember's way and the torch reference's way."""

    def __init__(self, hidden: int, inter: int, qkv_out: int, device: torch.device, dtype: torch.dtype) -> None:
        def lin(i: int, o: int) -> Linear:
            layer = Linear(i, o, bias=False, device=device, dtype=dtype)
            torch.nn.init.normal_(layer.weight, std=i ** -0.5)
            return layer.requires_grad_(False)

        self.qkv, self.o = lin(hidden, qkv_out), lin(hidden, hidden)
        self.gate_up, self.down = lin(hidden, 2 * inter), lin(inter, hidden)
        self.norm1 = RMSNorm(hidden, EPS).to(device, dtype).requires_grad_(False)
        self.norm2 = RMSNorm(hidden, EPS).to(device, dtype).requires_grad_(False)

    def ember(self, x: torch.Tensor, res: torch.Tensor, attn_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """As `LlamaDecoderLayer.forward` runs it, attention's output given: (MLP output, qkv, residual)."""
        h, res = self.norm1(x, res)
        qkv = self.qkv(h)
        h, res = self.norm2(self.o(attn_out), res)
        return self.down(silu_mul(self.gate_up(h))), qkv, res

    def ember_residual_in_products(self, hs: torch.Tensor, attn_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """As `LlamaDecoderLayer.forward_residual_in_products` runs it (steps of several tokens on one GPU): hs is
        the whole hidden state (x + residual), each residual added inside the product, in place: (the layer's
        output hidden state, qkv)."""
        qkv = self.qkv(self.norm1(hs))
        h = self.o(attn_out, residual=hs)
        return self.down(silu_mul(self.gate_up(self.norm2(h))), residual=h), qkv

    def reference(self, x: torch.Tensor, res: torch.Tensor, attn_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The same function in plain torch ops, what torch.compile is given."""
        h, res = rms_norm_ref(x, self.norm1.weight, EPS, res)
        qkv = F.linear(h, self.qkv.weight)
        h, res = rms_norm_ref(F.linear(attn_out, self.o.weight), self.norm2.weight, EPS, res)
        return F.linear(silu_mul_ref(F.linear(h, self.gate_up.weight)), self.down.weight), qkv, res


def op_cases(layer: Layer, t: int, hidden: int, inter: int, device: torch.device, dtype: torch.dtype
             ) -> dict[str, tuple[Callable[..., object], Callable[..., object], tuple[torch.Tensor, ...]]]:
    """Each op of the chain alone: (ember's, the torch reference, inputs) at `t` tokens."""
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    x = rand(t, hidden)
    cases: dict[str, tuple[Callable[..., object], Callable[..., object], tuple[torch.Tensor, ...]]] = {
        "add_rms_norm": (layer.norm1, lambda a, r: rms_norm_ref(a, layer.norm1.weight, EPS, r), (x, rand(t, hidden))),
        "silu_mul": (silu_mul, silu_mul_ref, (rand(t, 2 * inter),)),
    }
    for name, lin, width in (("qkv", layer.qkv, hidden), ("o", layer.o, hidden),
                             ("gate_up", layer.gate_up, hidden), ("down", layer.down, inter)):
        cases[name] = (lin, functools.partial(lambda a, w: F.linear(a, w), w=lin.weight), (rand(t, width),))
    return cases


def per_op_rows(layer: Layer, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                us: Callable[[Callable[[], object]], float]) -> list[dict[str, object]]:
    rows = []
    for t in args.tokens:
        for name, (ours, ref, inputs) in op_cases(layer, t, args.hidden, args.intermediate, device, dtype).items():
            # The products share one function: without a reset its compiled versions pile up to dynamo's
            # recompile limit, after which it silently runs them eagerly.
            torch._dynamo.reset()
            compiled = torch.compile(ref, dynamic=False)
            compiled(*inputs)
            row = {"tokens": t, "op": name, "ember_us": us(functools.partial(ours, *inputs)),
                   "compiled_us": us(functools.partial(compiled, *inputs))}
            rows.append(row)
            print(f"  tokens {t:4d} {name:12s} ember {row['ember_us']:7.1f} us, compiled {row['compiled_us']:7.1f} us "
                  f"({row['compiled_us'] / row['ember_us']:.3f}x)", flush=True)
    return rows


def max_rel_err(out: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...]) -> float:
    return max(((o.float() - r.float()).norm() / r.float().norm()).item() for o, r in zip(out, ref, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--qkv-out", type=int, default=6144, help="q + k + v widths (32 + 2 * 8 heads of 128)")
    ap.add_argument("--layers", type=int, default=32, help="to scale one layer's time to a step")
    ap.add_argument("--max-autotune", action="store_true", help="also mode=max-autotune-no-cudagraphs")
    ap.add_argument("--per-op", action="store_true", help="also time each op alone")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    layer = Layer(args.hidden, args.intermediate, args.qkv_out, device, dtype)
    us = timer(device)
    variants: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {
        "ember": layer.ember,
        "compiled": torch.compile(layer.reference, dynamic=False),
    }
    if args.max_autotune:
        variants["max-autotune"] = torch.compile(layer.reference, dynamic=False, mode="max-autotune-no-cudagraphs")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}; hidden {args.hidden}, intermediate {args.intermediate}, "
          f"qkv {args.qkv_out}, {dtype}; microseconds a layer (x {args.layers} layers = a step)", flush=True)
    rows = []
    for t in args.tokens:
        x, res, attn = (torch.randn(t, args.hidden, device=device, dtype=dtype) for _ in range(3))
        ref = layer.reference(x, res, attn)
        row: dict[str, object] = {"tokens": t}
        for vname, fn in variants.items():
            start = time.perf_counter()
            out = fn(x, res, attn)  # compiles here, once per shape
            row[f"{vname}_first_call_s"] = round(time.perf_counter() - start, 2)
            row[f"{vname}_max_rel_err"] = max_rel_err(out, ref)
            row[f"{vname}_us"] = us(functools.partial(fn, x, res, attn))
        if t > 1:  # where the engine takes that path (on a GPU)
            # It writes into its input, so the check runs on a copy; the replays keep adding into another.
            hs = x + res
            out = layer.ember_residual_in_products(hs.clone(), attn)
            row["ember_residual_in_products_max_rel_err"] = max_rel_err(out, (ref[0] + ref[2], ref[1]))
            row["ember_residual_in_products_us"] = us(functools.partial(layer.ember_residual_in_products, hs, attn))
            row["ember_residual_in_products_first_call_s"] = 0.0
        rows.append(row)
        base = row["ember_us"]
        shown = [*variants, *(["ember_residual_in_products"] if "ember_residual_in_products_us" in row else [])]
        print(f"tokens {t:4d}: " + ", ".join(
            f"{v} {row[f'{v}_us']:.1f} us ({row[f'{v}_us'] / base:.3f}x, first call {row[f'{v}_first_call_s']} s, "
            f"err {row[f'{v}_max_rel_err']:.1e})" for v in shown)
            + f"; a step: ember {base * args.layers / 1e3:.2f} ms", flush=True)
    ops = per_op_rows(layer, args, device, dtype, us) if args.per_op else []
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "dtype": str(dtype),
                                               "args": vars(args), "rows": rows, "ops": ops}, indent=1))


if __name__ == "__main__":
    main()
