"""The GPU path (Triton attention, CUDA graphs) against the CPU reference path, on the embedded SmolLM2."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from ember import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TOPICS = ["the ocean", "a lighthouse", "quantum computing", "bread baking", "the Roman empire", "volcanoes",
          "chess openings", "jazz", "photosynthesis", "the moon landing", "honey bees", "glaciers"]


def _prompts(tok) -> list[list[int]]:
    out = []
    for i, topic in enumerate(TOPICS * 2):
        text = f"Write about {topic}. " + "Be detailed and precise. " * (i * 3 % 17)
        out.append(tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]),
                              add_special_tokens=False))
    return out


@pytest.fixture(scope="module")
def cpu_reference():
    llm = LLM(device="cpu")
    prompts = _prompts(llm.tokenizer)
    outs = llm.generate(prompt_token_ids=prompts,
                        sampling_params=SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    return prompts, [o.outputs[0].token_ids for o in outs]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _compare_runs(first: list, second: list) -> tuple[int, float]:
    """(continuations identical in both runs, largest logprob difference over their common prefixes)."""
    same, worst = 0, 0.0
    for a, b in zip(first, second, strict=True):
        same += a.token_ids == b.token_ids
        n = _common_prefix(a.token_ids, b.token_ids)
        for tok, la, lb in zip(a.token_ids[:n], a.logprobs[:n], b.logprobs[:n], strict=True):
            worst = max(worst, abs(la[tok].logprob - lb[tok].logprob))
    return same, worst


def _agreement_with(llm: LLM, prompts: list[list[int]], ref: list[list[int]]) -> tuple[int, int, int]:
    """(positions before the first free-running divergence, top-1 agreements teacher-forced on `ref`, positions)."""
    outs = llm.generate(prompt_token_ids=prompts,
                        sampling_params=SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    free = sum(_common_prefix(o.outputs[0].token_ids, r) for o, r in zip(outs, ref, strict=True))
    forced = llm.generate(prompt_token_ids=[p + r for p, r in zip(prompts, ref, strict=True)],
                          sampling_params=SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    agree = total = 0
    for p, r, o in zip(prompts, ref, forced, strict=True):
        for j, tok in enumerate(r):
            total += 1
            agree += o.prompt_logprobs[len(p) + j][tok].rank == 1
    return free, agree, total


def test_gpu_fp32_free_running_matches_cpu(cpu_reference):
    prompts, ref = cpu_reference
    llm = LLM(device="cuda", dtype="float32", max_num_seqs=32)
    assert llm.engine.cuda_graphs_enabled
    outs = llm.generate(prompt_token_ids=prompts,
                        sampling_params=SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    got = [o.outputs[0].token_ids for o in outs]
    matched = sum(_common_prefix(a, b) for a, b in zip(got, ref, strict=True))
    total = sum(len(r) for r in ref)
    print(f"fp32 GPU vs CPU: {matched}/{total} positions before the first divergence")
    assert matched >= 0.99 * total


def test_gpu_bf16_agrees_with_cpu_choices(cpu_reference):
    """bf16 rounds differently from fp32, so a near-tie can flip and the continuations diverge from there.

    Teacher-forced on the CPU's outputs, the GPU's top token agrees with the CPU's at >= 99% of positions;
    free-running, the shared prefix is reported.
    """
    prompts, ref = cpu_reference
    llm = LLM(device="cuda", dtype="bfloat16", max_num_seqs=32)
    free, agree, total = _agreement_with(llm, prompts, ref)
    print(f"bf16 GPU vs fp32 CPU: top-1 agreement {agree}/{total} teacher-forced; "
          f"{free}/{total} positions before the first free-running divergence")
    assert agree >= 0.99 * total


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="an FP8 KV cache needs compute capability 8.9")
def test_gpu_fp8_kv_cache_agrees_with_cpu_choices(cpu_reference):
    """K/V stored as FP8 E4M3 (scale 1.0), through the Triton store and attention kernels, with CUDA graphs and
    the batch-1 GEMV's KV-store epilogue: teacher-forced on the CPU's fp32 outputs, the top token agrees at >= 95%
    of positions (the CPU's own FP8 cache agreed with its fp32 one at 191 of 192 prompt positions)."""
    prompts, ref = cpu_reference
    llm = LLM(device="cuda", dtype="bfloat16", max_num_seqs=32, kv_cache_dtype="fp8")
    assert llm.engine.cuda_graphs_enabled and llm.engine.kv_caches[0][0].dtype == torch.float8_e4m3fn
    free, agree, total = _agreement_with(llm, prompts, ref)
    one = llm.generate(prompt_token_ids=prompts[:1], sampling_params=SamplingParams(temperature=0, max_tokens=8))
    print(f"FP8 KV cache, bf16 GPU vs fp32 CPU: top-1 agreement {agree}/{total} teacher-forced; "
          f"{free}/{total} positions before the first free-running divergence; batch 1: {one[0].outputs[0].text!r}")
    assert agree >= 0.95 * total


def test_batch1_fused_paths_match_the_unfused_gpu_path(monkeypatch: pytest.MonkeyPatch):
    """One sequence a step through the GEMV with the RMSNorms folded into the products
    (`LlamaForCausalLM.fold_norms`) and rotary + KV store in the qkv product (`ember.kernels.gemv_qkv`): the same
    greedy tokens, and logprobs close to, the GEMV's unfused path (the fold rounds W·g once more in bf16)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the GEMV serves Hopper and later")
    from ember.kernels import gemv as gemv_mod
    from ember.kernels import gemv_qkv

    fused_calls = []
    original = gemv_qkv.gemv_rotary_store_kv
    monkeypatch.setattr(gemv_qkv, "gemv_rotary_store_kv", lambda *a, **kw: fused_calls.append(1) or original(*a, **kw))
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5)
    runs = []
    for fused in (False, True):
        monkeypatch.setattr(gemv_mod, "FOLD_NORMS", fused)
        monkeypatch.setattr(gemv_mod, "FUSE_ROTARY_KV", fused)
        with LLM(device="cuda", dtype="bfloat16", max_num_seqs=4) as llm:
            assert llm.engine.model.model.norms_folded == fused
            prompts = _prompts(llm.tokenizer)[:8]
            runs.append([llm.generate(prompt_token_ids=[p], sampling_params=sp)[0].outputs[0] for p in prompts])
    assert fused_calls
    same, worst = _compare_runs(*runs)
    print(f"fused vs unfused batch-1 GPU paths: {same}/8 identical continuations; logprob diff at most {worst:.4f}")
    assert same >= 7 and worst < 0.1


def _sixteen_prompts_off_and_on(switch: Callable[[bool], None],
                                 check: Callable[[LLM, bool], None] | None = None) -> tuple[int, float]:
    """`_compare_runs` of 16 prompts' greedy continuations (8 tokens, 5 logprobs each) on an engine made after
    `switch(False)` and one made after `switch(True)`; `check(llm, on)` looks at each engine first."""
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
    runs = []
    for on in (False, True):
        switch(on)
        with LLM(device="cuda", dtype="bfloat16", max_num_seqs=16) as llm:
            if check is not None:
                check(llm, on)
            prompts = _prompts(llm.tokenizer)[:16]
            runs.append([o.outputs[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)])
    return _compare_runs(*runs)


def test_residual_in_products_matches_the_fused_norm_path(monkeypatch: pytest.MonkeyPatch):
    """Several sequences a step with each residual added inside cuBLAS's product (`Linear.forward`, in place)
    against the add + RMSNorm kernel doing it: the same tokens and logprobs (on an H100 identical; a different
    rounding of the sum elsewhere may flip a rare near-tie)."""
    from ember.model import linear

    def check(llm: LLM, in_products: bool) -> None:
        assert llm.engine.model.model.residual_in_products == in_products

    # Read by the loader, before capture.
    same, worst = _sixteen_prompts_off_and_on(
        lambda on: monkeypatch.setattr(linear, "RESIDUAL_IN_PRODUCTS", on), check)
    print(f"residual in products vs in the norm kernel: {same}/16 identical continuations; logprob diff at most "
          f"{worst:.4f}")
    assert same >= 14 and worst < 0.1


def test_gate_up_silu_kernel_matches_the_unfused_mlp(monkeypatch: pytest.MonkeyPatch):
    """Prefill steps through the gate/up product with SiLU·mul in its epilogue (`ember.kernels.gate_up_silu`,
    its row threshold lowered so that SmolLM2's prompts take it) against cuBLAS + silu_mul: the same tokens and
    logprobs (both sum in fp32 and round each half once; the order of the sums may differ)."""
    from ember.kernels import gate_up_silu

    monkeypatch.setattr(gate_up_silu, "MIN_ROWS", 64)
    same, worst = _sixteen_prompts_off_and_on(lambda on: monkeypatch.setattr(gate_up_silu, "ENABLED", on))
    print(f"gate/up + SiLU·mul kernel vs cuBLAS + silu_mul: {same}/16 identical continuations; logprob diff at "
          f"most {worst:.4f}")
    assert same >= 14 and worst < 0.1


def test_graphs_holding_their_copies_match_the_graphs_without(monkeypatch: pytest.MonkeyPatch):
    """Decode graphs that hold their input copies and the greedy tokens' read-back (two a size, used in turn:
    `EMBER_GRAPH_COPIES_MAX_BATCH`), with async scheduling: the same tokens as the graphs with the copies outside,
    bit for bit (the same kernels on the same padded shapes), for greedy and seeded sampled rows, one sequence
    alone and four together."""
    from ember.engine import cuda_graphs

    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    mixed = [greedy, SamplingParams(temperature=0.8, seed=7, max_tokens=20, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
             SamplingParams(temperature=0.7, top_p=0.9, seed=3, max_tokens=28, ignore_eos=True)]
    runs = []
    for up_to in (0, 8):
        monkeypatch.setattr(cuda_graphs, "COPIES_IN_GRAPH_MAX_BATCH", up_to)  # read when the graphs are made
        with LLM(device="cuda", dtype="bfloat16", max_num_seqs=4) as llm:
            graphs = llm.engine.runner.graphs
            assert graphs is not None and llm.engine.async_scheduling
            assert graphs.holds_copies == ({1, 2, 4} if up_to else set())
            prompts = _prompts(llm.tokenizer)[:4]
            one = llm.generate(prompt_token_ids=prompts[:1], sampling_params=greedy)[0].outputs[0].token_ids
            four = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=mixed)]
            runs.append((one, four))
    assert runs[0] == runs[1]
