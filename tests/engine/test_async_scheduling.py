"""Async scheduling (a decode step queued before the previous one's tokens are read back) changes nothing in
the output: the same tokens, stops, finish reasons and text as the synchronous engine, with no leaked blocks.

On the CPU the "device" work runs at once, but the engine's bookkeeping is the one the GPU uses: pending
tokens fed to the next step from the sampled tensor, sequences ending while a step for them is queued,
preemption of a sequence with a pending token, aborts.
"""

from __future__ import annotations

import pytest

from ember import LLM, SamplingParams


@pytest.fixture(scope="module")
def make_llm(smol_llm):
    import torch

    from ember.config import EngineConfig
    from ember.engine.llm_engine import LLMEngine, load_model

    # float32 (the CPU default): this is about bookkeeping, and in bf16 on a GPU the different batch shapes of
    # the two runs may flip near-ties.
    loaded = smol_llm.engine.loaded
    if loaded.dtype != torch.float32:
        loaded = load_model(EngineConfig(dtype="float32"))

    def make(**kw):
        # A fixed cache size: on a GPU, sizing it from free memory would leave nothing for the next engine.
        kw.setdefault("num_gpu_blocks_override", 512)
        return LLM.from_engine(LLMEngine(EngineConfig(dtype="float32", **kw), loaded=loaded))

    return make


@pytest.fixture(scope="module")
def prompts(smol_llm):
    tok = smol_llm.tokenizer
    texts = ["Hello, my name is", "The history of the Roman Empire begins", "List three colors: red,",
             "Python is a programming language that", "Once upon a time", "The capital of France is",
             "A long time ago in a galaxy far, far away, there lived a young farmer who dreamed of the stars"]
    return [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts]


def _mixed_params() -> list[SamplingParams]:
    """Different lengths (some end by EOS, some by length), stop strings, n > 1, seeds, a min_tokens row."""
    return [
        SamplingParams(temperature=0, max_tokens=40),
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, stop=[","]),
        SamplingParams(temperature=0.8, seed=3, max_tokens=25, n=2),
        SamplingParams(temperature=0, max_tokens=1),
        SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=11, max_tokens=20, min_tokens=12),
        SamplingParams(temperature=0, max_tokens=33, ignore_eos=True),
    ]


def _summary(outs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


def _assert_no_leak(llm: LLM) -> None:
    st = llm.engine.stats()
    assert st["num_free_blocks"] == st["num_total_blocks"]
    assert st["num_running"] == st["num_waiting"] == 0
    assert all(b.ref_cnt == 0 for b in llm.engine.block_manager.blocks)


def _count_launches(llm: LLM) -> list[int]:
    calls = [0]
    launch = llm.engine.runner.launch_decode

    def counted(*a, **kw):
        calls[0] += 1
        return launch(*a, **kw)

    llm.engine.runner.launch_decode = counted  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize("engine_kw", [
    {},
    # A small token budget (chunked prefills mixed with queued decodes) and a cache small enough to preempt.
    {"num_gpu_blocks_override": 24, "block_size": 4, "max_num_batched_tokens": 12, "max_num_seqs": 8},
])
def test_async_matches_sync(make_llm, prompts, engine_kw):
    sync = make_llm(async_scheduling=False, **engine_kw)
    expected = _summary(sync.generate(prompts, _mixed_params()))
    _assert_no_leak(sync)
    llm = make_llm(async_scheduling=True, **engine_kw)
    launches = _count_launches(llm)
    got = _summary(llm.generate(prompts, _mixed_params()))
    assert got == expected
    assert launches[0] > 10  # decode steps really were queued ahead
    if engine_kw:
        assert llm.engine.scheduler.num_preemptions > 0
    _assert_no_leak(llm)


def test_abort_with_a_step_in_flight(make_llm, prompts):
    llm = make_llm(async_scheduling=True)
    eng = llm.engine
    ids = [llm.tokenizer.encode(p, add_special_tokens=False) for p in prompts[:3]]
    for i, p in enumerate(ids):
        eng.add_request(f"r{i}", None, p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(4):
        eng.step()
    assert eng._inflight is not None
    eng.abort_request("r1")
    finished = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["r1"].outputs[0].finish_reason == "abort"
    assert [len(finished[r].outputs[0].token_ids) for r in ("r0", "r2")] == [50, 50]
    # Whatever is still queued belongs to finished sequences only, and nothing leaked.
    assert eng._inflight is None or all(s.is_finished for s in eng._inflight.seqs)
    _assert_no_leak(llm)


def test_logprobs_and_grammar_rows_run_synchronously(make_llm, prompts):
    """Rows that need the host's view of the newest token are never queued ahead; the rest still are."""
    llm = make_llm(async_scheduling=True)
    launches = _count_launches(llm)
    out = llm.generate(prompts[:2], [SamplingParams(temperature=0, max_tokens=8, logprobs=2, ignore_eos=True)] * 2)
    assert launches[0] == 0
    assert all(len(c.logprobs) == 8 for o in out for c in o.outputs)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert launches[0] > 0
    _assert_no_leak(llm)


def test_recomputed_one_token_chunk_is_not_queued_ahead(make_llm):
    """A preempted sequence recomputed past its prompt can get a 1-token chunk that samples nothing (a budget
    of 4 with 3 decodes); such a step must run synchronously, not as a queued decode."""
    llm = make_llm(async_scheduling=False, block_size=4, max_num_batched_tokens=4, max_num_seqs=4)
    eng = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i in range(4):
        eng.add_request(f"r{i}", None, list(range(1, 10)) + [10 + i], sp.clone())
    for _ in range(30):
        eng.step()
    victim = eng.scheduler.running[-1]
    eng.scheduler.running.remove(victim)
    eng.scheduler._preempt(victim)
    eng.async_scheduling = True
    finished = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finished[out.request_id] = out
    assert sorted(finished) == ["r0", "r1", "r2", "r3"]
    assert all(len(o.outputs[0].token_ids) == 40 for o in finished.values())
    # The same prompts run synchronously from the start give the same tokens.
    ref = make_llm(async_scheduling=False).generate(
        prompt_token_ids=[list(range(1, 10)) + [10 + i] for i in range(4)], sampling_params=sp)
    assert [finished[f"r{i}"].outputs[0].token_ids for i in range(4)] == [o.outputs[0].token_ids for o in ref]
    _assert_no_leak(llm)
