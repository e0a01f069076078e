"""`kv_cache_dtype="fp8"`: K/V stored as FP8 E4M3 (scale 1.0), read back into the activation dtype."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ember import LLM, SamplingParams
from ember.attention.torch_ref import gather_kv, store_kv
from ember.engine.kv_cache import bytes_per_block, kv_cache_dtype

FP8 = torch.float8_e4m3fn
CPU = torch.device("cpu")


def test_dtype_names_and_block_bytes() -> None:
    assert kv_cache_dtype("auto", torch.bfloat16, CPU) == torch.bfloat16
    assert kv_cache_dtype("fp8", torch.float32, CPU) == kv_cache_dtype("fp8_e4m3", torch.bfloat16, CPU) == FP8
    with pytest.raises(ValueError, match="fp8_e5m2"):
        kv_cache_dtype("fp8_e5m2", torch.bfloat16, CPU)


def test_store_and_read_back() -> None:
    """The cache holds each value rounded to E4M3 (saturating at ±448); padding slots (-1) are skipped."""
    gen = torch.Generator().manual_seed(0)
    cache_k = torch.full((4, 16, 2, 8), float("nan"), dtype=FP8)
    cache_v = torch.full_like(cache_k, float("nan"))
    k = torch.randn(5, 2, 8, generator=gen) * 100
    k[0, 0, 0], k[0, 0, 1] = 1000.0, -1000.0
    v = torch.randn(5, 2, 8, generator=gen)
    slots = torch.tensor([17, 18, -1, 19, 20])
    store_kv(k, v, cache_k, cache_v, slots)
    got_k = gather_kv(cache_k, torch.tensor([0, 1]), 21)[17:].float()
    got_v = gather_kv(cache_v, torch.tensor([0, 1]), 21)[17:].float()
    keep = slots >= 0
    assert torch.equal(got_k, k[keep].to(FP8).float()) and torch.equal(got_v, v[keep].to(FP8).float())
    assert got_k[0, 0, 0] == 448 and got_k[0, 0, 1] == -448
    assert torch.isnan(gather_kv(cache_k, torch.tensor([0, 1]), 17).float()).all()  # nothing else written


def test_engine_with_an_fp8_cache(smol_llm: Any) -> None:
    """The same memory holds four times the tokens of fp32 (twice those of bf16). Teacher-forced, the next-token
    choices stay those of the fp32 cache at >= 95 % of positions (191 of 192 when measured), logprobs close."""
    budget = 64 << 20
    llm = LLM(kv_cache_dtype="fp8", max_model_len=1024, kv_cache_memory_bytes=budget)
    eng = llm.engine
    assert eng.kv_caches[0][0].dtype == FP8
    assert bytes_per_block(eng.arch, 16, FP8) * 4 == bytes_per_block(eng.arch, 16, torch.float32)
    assert eng.block_manager.num_blocks == budget // bytes_per_block(eng.arch, eng.block_size, FP8)
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    assert "Paris" in out[0].outputs[0].text
    ids = llm.tokenizer.encode("The history of the sea, told by a sailor who crossed it forty times. " * 12)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    got = llm.generate(prompt_token_ids=[ids], sampling_params=params)[0].prompt_logprobs
    want = smol_llm.generate(prompt_token_ids=[ids], sampling_params=params)[0].prompt_logprobs
    assert got is not None and want is not None
    positions = range(1, len(ids))
    agree = sum(max(got[i].items(), key=lambda t: t[1].logprob)[0] == max(want[i].items(),
                key=lambda t: t[1].logprob)[0] for i in positions)
    diffs = [abs(got[i][ids[i]].logprob - want[i][ids[i]].logprob) for i in positions]
    assert agree >= 0.95 * len(positions)
    assert sum(diffs) / len(diffs) < 0.05
    assert max(diffs) > 0  # the cache did round


def test_the_roofline_counts_a_byte_a_value_for_an_fp8_cache() -> None:
    from ember.bench.roofline import Roofline, kv_bytes_per_token, weight_bytes_per_step
    from ember.config import EngineConfig
    from ember.model.config import ModelArchConfig
    from ember.model.loader import resolve_model

    arch = ModelArchConfig.from_hf(resolve_model(EngineConfig(model="llama-3.1-8b-instruct",
                                                              load_format="dummy")).hf_config)
    assert kv_bytes_per_token(arch, torch.bfloat16) == 2 * kv_bytes_per_token(arch, FP8) == 131072
    memory_bound = Roofline(bandwidth=1e12, matmul_rate=1e30)
    weights, ctx = weight_bytes_per_step(arch, torch.bfloat16), 64 * 1000
    for kv_dtype, per_token in ((None, 131072), (FP8, 65536)):
        step = memory_bound.step_time(arch, torch.bfloat16, 64, ctx, 0.0, kv_dtype=kv_dtype)
        assert step == pytest.approx((weights + ctx * per_token) / 1e12)
