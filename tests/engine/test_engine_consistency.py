"""The same prompts give the same greedy tokens however they are batched, cached, chunked or preempted."""

from __future__ import annotations

import pytest

from ember import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(smol_llm):
    tok = smol_llm.tokenizer
    texts = ["Hello, my name is", "The history of the Roman Empire begins",
             "Python is a programming language that", "List three colors: red,",
             "A long time ago in a galaxy far, far away, there lived a young farmer who dreamed of the stars"]
    return [tok.encode(t) for t in texts]


@pytest.fixture(scope="module")
def reference(smol_llm, prompts):
    """Each prompt alone."""
    return [smol_llm.generate(prompt_token_ids=[p], sampling_params=GREEDY)[0].outputs[0].token_ids
            for p in prompts]


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def _assert_no_leak(llm: LLM):
    st = llm.engine.stats()
    assert st["num_free_blocks"] == st["num_total_blocks"]
    assert st["num_running"] == st["num_waiting"] == 0
    assert all(b.ref_cnt == 0 for b in llm.engine.block_manager.blocks)


def test_batched_together(smol_llm, prompts, reference):
    assert _tokens(smol_llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)) == reference
    _assert_no_leak(smol_llm)


def test_prefix_cache_hit(smol_llm, prompts, reference):
    bm = smol_llm.engine.block_manager
    hits = bm.prefix_hits
    # The long prompt has full blocks that the earlier runs left in the cache.
    out = smol_llm.generate(prompt_token_ids=[prompts[4]], sampling_params=GREEDY)[0]
    assert bm.prefix_hits > hits
    assert out.num_cached_tokens > 0
    assert out.outputs[0].token_ids == reference[4]


@pytest.fixture(scope="module")
def small_engine_llm(smol_llm):
    """Same weights, a tiny KV cache and token budget: forces chunked prefill and preemption."""
    from ember.config import EngineConfig
    from ember.engine.llm_engine import LLMEngine

    def make(**kw):
        return LLM.from_engine(LLMEngine(EngineConfig(**kw), loaded=smol_llm.engine.loaded))

    return make


def test_chunked_prefill_small_budget(small_engine_llm, prompts, reference):
    llm = small_engine_llm(num_gpu_blocks_override=200, block_size=4, max_num_batched_tokens=5, max_num_seqs=8)
    assert _tokens(llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)) == reference
    _assert_no_leak(llm)


def test_preemption_recomputes_correctly(small_engine_llm, prompts, reference):
    # 12 blocks of 4 tokens cannot hold all five sequences at full length: some must be preempted.
    llm = small_engine_llm(num_gpu_blocks_override=12, block_size=4, max_num_batched_tokens=64, max_num_seqs=8)
    assert _tokens(llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)) == reference
    assert llm.engine.scheduler.num_preemptions > 0
    _assert_no_leak(llm)


def test_preemption_without_prefix_cache(small_engine_llm, prompts, reference):
    llm = small_engine_llm(num_gpu_blocks_override=12, block_size=4, max_num_batched_tokens=7, max_num_seqs=8,
                           enable_prefix_caching=False)
    assert _tokens(llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)) == reference
    assert llm.engine.scheduler.num_preemptions > 0
    _assert_no_leak(llm)
