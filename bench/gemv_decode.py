"""Batch-1 products through ember's GEMV (`ember/kernels/gemv.py`: launched early, reading its weights while the
short kernels ahead run) against cuBLAS, on a GPU.

    python bench/gemv_decode.py [--model llama-3.1-8b-instruct] [--tokenizer DIR] [--sweep] [--engine] [--json F]

Products: each projection of a whole forward pass (32 layers, each its own weight, M = 1) as one CUDA graph per
shape, and all of them with the lm_head in one graph: cuBLAS (`F.linear`) against the GEMV without a prefetch
(nothing runs ahead of it here, so a prefetch has nothing to overlap). `--sweep` times a grid of launch shapes per
projection and prints the fastest.

`--engine`: whole decode steps of the engine at batch 1, the decode graphs re-captured for each variant (`VARIANTS`:
cuBLAS; the GEMV as ember runs it; rotary + KV store as their own kernel; short kernels releasing early only within
one wave, or late; 8 MB prefetched; RMSNorms inside the products, `LlamaForCausalLM.fold_norms`: the weights are
folded for every variant, which computes the same function with weightless norms; the qkv GEMV releasing attention
at its wait, alone and with attention's L2 prefetch before its own, `EMBER_ATTN_PREFETCH`), two alternating rounds,
beside the HBM roofline measured now. Each variant is timed on a fresh sequence, at contexts `--context` + 20 to +
20 + `--steps`. The logits of one replay of each variant are compared with cuBLAS's. `--skip` adds steps with the
launches of one kind of short kernel left out (attention, rotary + KV store, RMSNorm, SiLU·mul, all of them; from
`SKIP_BASE`, where each is its own launch): what each costs in the chain.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import ember.attention.triton_backend as backend_mod
import ember.kernels.fused as fused_mod
import ember.kernels.gemv as gemv_mod
import ember.kernels.gemv_qkv as gemv_qkv_mod
import ember.kernels.paged_attention as attention_mod
import ember.kernels.pdl as pdl_mod
from ember.bench.offline import random_prompts
from ember.bench.profiling import graph_time
from ember.bench.roofline import measure_bandwidth, model_weight_bytes, projection_shapes
from ember.config import EngineConfig
from ember.engine.llm_engine import LLMEngine, decode_graph_shape
from ember.kernels.gemv import GemvConfig, default_config, gemv
from ember.model.config import ModelArchConfig
from ember.model.loader import resolve_model
from ember.sampling_params import SamplingParams

MB = 1 << 20


def _sweep_configs(k: int) -> list[GemvConfig]:
    return [GemvConfig(bn, bk, warps, stages)
            for bn, bk, warps, stages in itertools.product((2, 4), (1024, 2048), (4, 8), (3, 4, 6))
            if bn * bk <= 8192 and bk <= k]


def products(args: argparse.Namespace, results: dict) -> None:
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    arch = ModelArchConfig.from_hf(resolve_model(EngineConfig(model=args.model, load_format="dummy")).hf_config)
    shapes = dict(projection_shapes(arch), lm_head=(arch.vocab_size, arch.hidden_size))
    layers = arch.num_hidden_layers
    ws = {name: [torch.randn(n, k, device=dev, dtype=dtype) / k ** 0.5 for _ in range(1 if name == "lm_head"
                                                                                    else layers)]
          for name, (n, k) in shapes.items()}
    xs = {name: torch.randn(1, k, device=dev, dtype=dtype) for name, (n, k) in shapes.items()}
    copy_bw = measure_bandwidth(dev)
    print(f"{torch.cuda.get_device_name()}: copy {copy_bw / 1e9:,.0f} GB/s")
    results["products"] = {"copy_gb_s": copy_bw / 1e9}
    for name, wl in ws.items():  # the two agree before anything is timed
        ref, got = F.linear(xs[name], wl[0]).float(), gemv(xs[name], wl[0], prefetch_bytes=0).float()
        err = (ref - got).abs().max().item()
        assert err <= 2e-2 * ref.abs().max().item() + 1e-3, (name, err)

    def chain(name: str, cfg: GemvConfig | None) -> float:
        x = xs[name]
        if cfg is None:
            return graph_time(lambda: [F.linear(x, w) for w in ws[name]])
        return graph_time(lambda: [gemv(x, w, config=cfg, prefetch_bytes=0) for w in ws[name]])

    best: dict[str, GemvConfig] = {}
    for name, (n, k) in shapes.items():
        nbytes = sum(w.numel() * w.element_size() for w in ws[name])
        t_cublas = chain(name, None)
        cfg0 = default_config(n, k)
        t_gemv = chain(name, cfg0)
        row = {"cublas_us": t_cublas * 1e6, "gemv_us": t_gemv * 1e6, "default": cfg0.__dict__,
               "cublas_gb_s": nbytes / t_cublas / 1e9, "gemv_gb_s": nbytes / t_gemv / 1e9}
        best[name] = cfg0
        if args.sweep:
            sweep = {c: chain(name, c) for c in _sweep_configs(k)}
            top = min(sweep, key=sweep.__getitem__)
            best[name] = top if sweep[top] < t_gemv else cfg0
            row["best"], row["best_us"] = top.__dict__, sweep[top] * 1e6
            row["sweep"] = sorted(([c.block_n, c.block_k, c.num_warps, c.num_stages, round(t * 1e6, 1)]
                                   for c, t in sweep.items()), key=lambda r: r[-1])
        print(f"{name:13s} x{len(ws[name])}: cuBLAS {t_cublas * 1e6:8.1f} us ({row['cublas_gb_s']:,.0f} GB/s)  "
              f"GEMV {t_gemv * 1e6:8.1f} us ({row['gemv_gb_s']:,.0f} GB/s)"
              + (f"  best {best[name]} {row['best_us']:.1f} us" if args.sweep else ""))
        results["products"][name] = row

    def forward(use_gemv: bool, cfgs: dict[str, GemvConfig]) -> None:
        for layer in range(layers):
            for name in projection_shapes(arch):
                w = ws[name][layer]
                gemv(xs[name], w, config=cfgs[name], prefetch_bytes=0) if use_gemv else F.linear(xs[name], w)
        w = ws["lm_head"][0]
        gemv(xs["lm_head"], w, config=cfgs["lm_head"], prefetch_bytes=0) if use_gemv else F.linear(xs["lm_head"], w)

    defaults = {name: default_config(n, k) for name, (n, k) in shapes.items()}
    fw = {"cublas": graph_time(lambda: forward(False, defaults)), "gemv": graph_time(lambda: forward(True, defaults))}
    if args.sweep:
        fw["gemv_best"] = graph_time(lambda: forward(True, best))
    total = sum(w.numel() * w.element_size() for wl in ws.values() for w in wl)
    for label, t in fw.items():
        print(f"forward's products, {label:10s} {t * 1e6:8.1f} us ({total / t / 1e9:,.0f} GB/s; "
              f"{total / copy_bw / t * 100:.1f} % of the copy rate)")
    results["products"]["forward_us"] = {k: v * 1e6 for k, v in fw.items()}
    ws.clear()
    torch.cuda.empty_cache()


@dataclass(frozen=True)
class Variant:
    """One way to run the batch-1 step; the defaults are ember's."""

    gemv: bool = True  # False: cuBLAS
    prefetch_mb: int = 0  # of each weight, into L2 before the wait
    # Short kernels release: "late" after their loads, "wave" as they start if their programs fit one wave,
    # "all" as they start.
    early: str = "all"
    silu: bool = False  # SiLU·mul inside the gate/up GEMV
    fold: bool = False  # RMSNorms inside the products (`LlamaForCausalLM.fold_norms`)
    rotary_kv: bool = True  # rotary + KV store inside the qkv GEMV (`ember.kernels.gemv_qkv`)
    qkv_release_at_wait: bool = False  # the qkv GEMV releases attention right after its wait
    attn_prefetch: bool = False  # split-KV attention asks L2 for its K/V before its wait


VARIANTS = {
    "cublas": Variant(gemv=False),
    "gemv": Variant(),
    "gemv_separate_rotary_kv": Variant(rotary_kv=False),
    "gemv_wave": Variant(early="wave"),
    "gemv_late": Variant(early="late"),
    "gemv_pf8": Variant(prefetch_mb=8),
    "gemv_fold": Variant(fold=True),
    "gemv_qkv_release_at_wait": Variant(qkv_release_at_wait=True),
    "gemv_attn_prefetch": Variant(qkv_release_at_wait=True, attn_prefetch=True),  # EMBER_ATTN_PREFETCH=1
}
# The base of the --skip variants: every short kernel its own launch.
SKIP_BASE = "gemv_separate_rotary_kv"


def _set(variant: str, model: torch.nn.Module) -> None:
    v = VARIANTS[variant]
    # The weights are folded once (the model computes the same function either way); this picks the path.
    model.model.norms_folded = v.fold
    gemv_mod.ENABLED, gemv_mod.FUSE_SILU_MUL, gemv_mod.FUSE_ROTARY_KV = v.gemv, v.silu, v.rotary_kv
    pdl_mod.EARLY_RELEASE, pdl_mod.EARLY_RELEASE_ANY_SIZE = v.early != "late", v.early == "all"
    gemv_mod.PREFETCH_BYTES = gemv_mod.AFTER_ATTENTION_PREFETCH_BYTES = v.prefetch_mb * MB
    gemv_qkv_mod.RELEASE_AT_WAIT, attention_mod.PREFETCH_BEFORE_WAIT = v.qkv_release_at_wait, v.attn_prefetch


def _rms_norm_skipped(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    return x if residual is None else (x, residual)


# What each short kernel costs in the chain: the step with its launches left out (results are garbage, the
# timing is what counts; the request is greedy, so NaNs cannot upset the sampler).
SKIPPED = {
    "attention": [(backend_mod, "paged_attention", lambda q, *args, **kw: q)],
    "rotary_kv": [(backend_mod, "rotary_store_kv", lambda *args, **kw: None)],
    "rms_norm": [(fused_mod, "rms_norm", _rms_norm_skipped)],
    "silu_mul": [(fused_mod, "silu_mul", lambda gu: gu.new_empty(*gu.shape[:-1], gu.shape[-1] // 2))],
}
SKIPPED["all_short"] = [patch for patches in SKIPPED.values() for patch in patches]


def _skip(name: str | None) -> None:
    """Leave out the launches of `SKIPPED[name]`, restoring every other one (None: restore all)."""
    for mod, attr, _ in SKIPPED["all_short"]:
        original = getattr(mod, "_original_" + attr, None)
        if original is not None:
            setattr(mod, attr, original)
    for mod, attr, stand_in in SKIPPED.get(name, []) if name else []:
        setattr(mod, "_original_" + attr, getattr(mod, attr))
        setattr(mod, attr, stand_in)


def _replay_ms(graph: torch.cuda.CUDAGraph, reps: int = 50) -> float:
    for _ in range(3):
        graph.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


def engine(args: argparse.Namespace, results: dict) -> None:
    cfg = EngineConfig(model=args.model, load_format="dummy", tokenizer=args.tokenizer, max_model_len=4096,
                       max_num_seqs=8)
    eng = LLMEngine(cfg)
    warm = 20
    requests = itertools.count()

    def fresh_request() -> None:
        """A new sequence of `args.context` prompt tokens, prefilled and `warm` steps into its decode, so that every
        variant is timed over the same contexts (a fresh random prompt: nothing comes from the prefix cache)."""
        for rid in list(eng.requests):
            eng.abort_request(rid)
        n = next(requests)
        (prompt,) = random_prompts(1, args.context, eng.arch.vocab_size, seed=n)
        eng.add_request(f"r{n}", None, prompt, SamplingParams(temperature=0, max_tokens=warm + args.steps + 8,
                                                               ignore_eos=True))
        for _ in range(1 + warm):
            eng.step()

    fresh_request()
    shape = decode_graph_shape(cfg, eng.device, eng.runner.attn, eng.max_model_len)
    assert shape is not None
    if not eng.model.model.norms_folded:
        eng.model.fold_norms()

    def recapture(variant: str) -> None:
        _set(variant.split("-skip-")[0], eng.model)
        _skip(variant.split("-skip-")[1] if "-skip-" in variant else None)
        eng.runner.release_graphs()
        eng.runner.enable_cuda_graphs(*shape)

    # Logits of one replay per variant on the same inputs (a replay rewrites the same KV slot with the same values).
    chosen = args.variants or list(VARIANTS)
    assert "cublas" in chosen and set(chosen) <= set(VARIANTS), chosen
    logits = {}
    for v in chosen:
        recapture(v)
        eng.runner.graphs.graphs[1].replay()
        logits[v] = eng.runner.graphs.outputs[1][0].float().clone()
    ref = logits["cublas"]
    agree = {v: {"max_abs_diff": (lg - ref).abs().max().item(), "argmax_equal": bool(lg.argmax() == ref.argmax())}
             for v, lg in logits.items()}
    print("logits vs cuBLAS:", agree)

    copy_bw = measure_bandwidth(eng.device)
    wbytes = model_weight_bytes(eng.model)
    roof_ms = wbytes / copy_bw * 1e3
    print(f"copy {copy_bw / 1e9:,.0f} GB/s, weights {wbytes / 1e9:.2f} GB: roofline {roof_ms:.3f} ms a step")
    variants = chosen + ([f"{SKIP_BASE}-skip-{name}" for name in SKIPPED] if args.skip else [])
    timings: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for _ in range(2):
        for v in variants:
            recapture(v)
            fresh_request()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.steps):
                eng.step()
            torch.cuda.synchronize()
            assert eng.has_unfinished_requests()  # every step timed was a decode step
            step_ms = (time.perf_counter() - t) / args.steps * 1e3
            replay_ms = _replay_ms(eng.runner.graphs.graphs[1])
            timings[v].append({"step_ms": step_ms, "replay_ms": replay_ms})
            print(f"{v:22s} step {step_ms:.3f} ms ({roof_ms / step_ms * 100:.1f} % of the roofline), "
                  f"graph replay {replay_ms:.3f} ms")
    results["engine"] = {"copy_gb_s": copy_bw / 1e9, "weight_bytes": wbytes, "roofline_ms": roof_ms,
                         "logits_vs_cublas": agree, "timings": timings}
    recapture("gemv")
    eng.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b-instruct")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--engine", action="store_true")
    ap.add_argument("--no-products", action="store_true")
    ap.add_argument("--variants", nargs="+", default=None, help=f"with --engine: some of {', '.join(VARIANTS)}")
    ap.add_argument("--skip", action="store_true", help="with --engine: also time steps without each short kernel")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--context", type=int, default=160, help="prompt tokens of the --engine sequences")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if not args.no_products:
        products(args, results)
    if args.engine:
        engine(args, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
