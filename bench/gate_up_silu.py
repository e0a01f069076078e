"""Would SiLU·mul in the gate_up product's epilogue pay? A Triton GEMM that does it, against cuBLAS + ember's kernel.

    python bench/gate_up_silu.py [--rows 64 512 1024 4096 8192] [--json FILE]

The MLP of a Llama layer writes gate_up = x @ W.T ([rows, 2 * inter]), then SiLU·mul reads it back and writes
[rows, inter]. At ~5,000 tokens a step (offline) that second kernel is ~3.5 % of the step, at the copy rate already
(`bench/elementwise.py`): only fusion removes it. Here one program computes a [BLOCK_M, BLOCK_N] tile of both
halves (the gate rows j.. and the up rows inter + j.. of W share the x tile) and writes SiLU(gate) * up, rounded
as the unfused path rounds (each half to the activation dtype first). Four kernels: loading by pointers, by tensor
descriptors (TMA on Hopper), on weights interleaved by column block, and the engine's
(`ember/kernels/gate_up_silu.py`: W seen as [2, inter, hidden]). It pays only if this GEMM keeps up with
cuBLAS: printed beside the fused time are cuBLAS's product alone and cuBLAS + `silu_mul`, for launch shapes swept.

On a CPU (`--device cpu`, run under `TRITON_INTERPRET=1`, small shapes: `--hidden 64 --intermediate 96 --rows 5
33`) it checks the kernel's arithmetic against the torch reference only.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

from ember.bench.profiling import replay_us  # noqa: E402
from ember.kernels.gate_up_silu import gate_up_silu as gate_up_silu_3d  # noqa: E402
from ember.kernels.gate_up_silu import grouped_tile, store_silu_mul  # noqa: E402
from ember.model.layers import silu_mul, silu_mul_ref  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps); each program holds two [BLOCK_M, BLOCK_N] fp32 accumulators.
CONFIGS = [(16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 4),
           (128, 64, 64, 4, 4), (128, 64, 64, 4, 8), (128, 128, 64, 3, 8), (128, 128, 64, 4, 8),
           (128, 128, 64, 5, 8), (128, 256, 64, 3, 8), (64, 256, 64, 3, 8), (256, 64, 64, 3, 8)]


@triton.jit
def _gate_up_silu_kernel(x_ptr, w_ptr, out_ptr, M, N, stride_xm, stride_wn, stride_om, K: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :]
    g_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_wn + ks[:, None]  # W^T's [BLOCK_K, BLOCK_N] tile
    u_ptrs = g_ptrs + N * stride_wn
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < N
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=row_ok, other=0.0)
            bg = tl.load(g_ptrs, mask=col_ok, other=0.0)
            bu = tl.load(u_ptrs, mask=col_ok, other=0.0)
        else:
            k_ok = ks < K - k
            a = tl.load(x_ptrs, mask=row_ok & k_ok[None, :], other=0.0)
            bg = tl.load(g_ptrs, mask=col_ok & k_ok[:, None], other=0.0)
            bu = tl.load(u_ptrs, mask=col_ok & k_ok[:, None], other=0.0)
        acc_g = tl.dot(a, bg, acc_g)
        acc_u = tl.dot(a, bu, acc_u)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    store_silu_mul(acc_g, acc_u, out_ptr, pid_m, pid_n, M, N, stride_om, BLOCK_M, BLOCK_N)


@triton.jit
def _gate_up_silu_tma_kernel(x_desc, w_desc, out_ptr, M, N, stride_om, K: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """The same tile through tensor descriptors (Hopper's TMA loads; out-of-bounds rows read as zeros). A gate
    tile that runs past row N reads up rows: only into output columns >= N, which are not stored."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = x_desc.load([pid_m * BLOCK_M, k])
        acc_g = tl.dot(a, w_desc.load([pid_n * BLOCK_N, k]).T, acc_g)
        acc_u = tl.dot(a, w_desc.load([N + pid_n * BLOCK_N, k]).T, acc_u)
    store_silu_mul(acc_g, acc_u, out_ptr, pid_m, pid_n, M, N, stride_om, BLOCK_M, BLOCK_N)


@triton.jit
def _gate_up_silu_interleaved_kernel(x_desc, w_desc, out_ptr, M, N, stride_om, K: tl.constexpr,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                     GROUP_M: tl.constexpr):
    """W's rows interleaved in blocks of BLOCK_N (gate block j, then up block j: `interleave`), so one
    [BLOCK_M, 2 * BLOCK_N] product (Hopper's widest wgmma at BLOCK_N 128) gives both halves of a tile."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        acc = tl.dot(x_desc.load([pid_m * BLOCK_M, k]), w_desc.load([pid_n * 2 * BLOCK_N, k]).T, acc)
    acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
    store_silu_mul(acc_g, acc_u, out_ptr, pid_m, pid_n, M, N, stride_om, BLOCK_M, BLOCK_N)


def interleave(weight: torch.Tensor, block_n: int) -> torch.Tensor:
    """[gate; up] ([2 * inter, hidden]) reordered as gate block 0, up block 0, gate block 1, ... of block_n rows
    (inter a multiple of block_n)."""
    n, k = weight.shape[0] // 2, weight.shape[1]
    return torch.stack([weight[:n].view(n // block_n, block_n, k), weight[n:].view(n // block_n, block_n, k)],
                       dim=1).reshape(2 * n, k)


def gate_up_silu_interleaved(x: torch.Tensor, w_il: torch.Tensor, config: tuple[int, int, int, int, int]
                             ) -> torch.Tensor:
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = x.shape
    n = w_il.shape[0] // 2
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm, bn, bk, stages, warps = config
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _gate_up_silu_interleaved_kernel[grid](TensorDescriptor.from_tensor(x, [bm, bk]),
                                           TensorDescriptor.from_tensor(w_il, [2 * bn, bk]), out, m, n,
                                           out.stride(0), K=k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                                           num_stages=stages, num_warps=warps)
    return out


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, int, int, int, int],
                 tma: bool = False) -> torch.Tensor:
    """SiLU(x @ gate.T) * (x @ up.T) for weight = [gate; up] ([2 * inter, hidden]), in one kernel (`tma`: its
    loads through tensor descriptors)."""
    m, k = x.shape
    n = weight.shape[0] // 2
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm, bn, bk, stages, warps = config
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        _gate_up_silu_tma_kernel[grid](TensorDescriptor.from_tensor(x, [bm, bk]),
                                       TensorDescriptor.from_tensor(weight, [bn, bk]), out, m, n, out.stride(0),
                                       K=k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_stages=stages,
                                       num_warps=warps)
        return out
    _gate_up_silu_kernel[grid](x, weight, out, m, n, x.stride(0), weight.stride(0), out.stride(0), K=k,
                               BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, EVEN_K=k % bk == 0,
                               num_stages=stages, num_warps=warps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 512, 1024, 4096, 8192])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    weight = torch.randn(2 * args.intermediate, args.hidden, device=device, dtype=dtype) * args.hidden ** -0.5
    configs = CONFIGS if device.type == "cuda" else [(16, 16, 16, 1, 1), (16, 32, 32, 1, 1)]
    interleaved = functools.cache(functools.partial(interleave, weight))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}; hidden {args.hidden}, "
          f"intermediate {args.intermediate}, {dtype}", flush=True)
    results = []
    for rows in args.rows:
        x = torch.randn(rows, args.hidden, device=device, dtype=dtype)
        ref = silu_mul_ref(F.linear(x, weight))
        # (label, function) of each kernel and launch shape; shapes that do not fit the card are left out.
        variants = {}
        for cfg in configs:
            variants[f"ptr {cfg}"] = functools.partial(gate_up_silu, x, weight, cfg, False)
            variants[f"tma {cfg}"] = functools.partial(gate_up_silu, x, weight, cfg, True)
            variants[f"3d {cfg}"] = functools.partial(gate_up_silu_3d, x, weight, cfg)
            if args.intermediate % cfg[1] == 0:
                variants[f"interleaved {cfg}"] = functools.partial(gate_up_silu_interleaved, x,
                                                                   interleaved(cfg[1]), cfg)
        errs = {}
        for label, fn in list(variants.items()):
            try:
                got = fn()
            except OutOfResources as e:
                print(f"  {label}: {e}", flush=True)
                del variants[label]
                continue
            errs[label] = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        worst = max(errs.values())
        if device.type != "cuda":
            print(f"rows {rows}: largest relative error over the launch shapes {worst:.2e}", flush=True)
            assert worst < 1e-5, errs
            continue
        flops = 2 * rows * args.hidden * 2 * args.intermediate
        row = {"rows": rows, "max_rel_err": worst,
               "cublas_us": replay_us(functools.partial(F.linear, x, weight)),
               "cublas_silu_us": replay_us(lambda x=x: silu_mul(F.linear(x, weight)))}
        row["fused_us"] = {label: replay_us(fn) for label, fn in variants.items()}
        best_cfg, best = min(row["fused_us"].items(), key=lambda kv: kv[1])
        row["best_config"], row["best_fused_us"] = best_cfg, best
        results.append(row)
        print(f"rows {rows:5d}: cuBLAS {row['cublas_us']:8.1f} us ({flops / row['cublas_us'] / 1e6:5.0f} TFLOP/s), "
              f"+ silu_mul {row['cublas_silu_us']:8.1f} us | fused best {best:8.1f} us "
              f"({flops / best / 1e6:5.0f} TFLOP/s, {best_cfg}): {best / row['cublas_silu_us']:.3f}x of unfused; "
              f"err {worst:.1e}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__,
                                               "triton": triton.__version__, "args": vars(args),
                                               "rows": results}, indent=1))


if __name__ == "__main__":
    main()
