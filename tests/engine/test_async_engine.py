"""AsyncEngine: streaming deltas, early close aborts, validation errors, shared step loop."""

from __future__ import annotations

import asyncio

import pytest

from ember import SamplingParams
from ember.config import EngineConfig
from ember.engine.async_engine import AsyncEngine
from ember.engine.errors import RequestValidationError
from ember.engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def engine(smol_llm):
    return AsyncEngine(EngineConfig(), engine=LLMEngine(EngineConfig(), loaded=smol_llm.engine.loaded))


def test_stream_deltas_concatenate_to_final_text(engine):
    async def go():
        ids = engine.tokenizer.encode("Tell me about the sea.")
        sp = SamplingParams(n=2, temperature=0.9, seed=3, max_tokens=12, logprobs=1)
        texts, tokens, n_lp = ["", ""], [[], []], [0, 0]
        last = None
        async for out in engine.generate(None, ids, sp, "stream-1"):
            for c in out.outputs:
                texts[c.index] += c.delta_text
                tokens[c.index] += c.delta_token_ids
                n_lp[c.index] += len(c.delta_logprobs or [])
            last = out
        assert last is not None and last.finished
        for c in last.outputs:
            assert texts[c.index] == c.text and tokens[c.index] == c.token_ids
            assert n_lp[c.index] == len(c.token_ids) <= 12
        await engine.shutdown()

    asyncio.run(go())


def test_concurrent_requests_and_early_close_abort(engine):
    async def go():
        ids = engine.tokenizer.encode("Write an essay.")

        async def full(rid):
            sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
            outs = [o async for o in engine.generate(None, ids, sp, rid)]
            return outs[-1].outputs[0].token_ids

        async def abandon(rid):
            gen = engine.generate(None, ids, SamplingParams(max_tokens=500, ignore_eos=True), rid)
            async for _ in gen:
                break
            await gen.aclose()

        a, b, _ = await asyncio.gather(full("a"), full("b"), abandon("c"))
        assert a == b and len(a) == 8
        for _ in range(100):
            st = engine.stats()
            if st["num_requests"] == 0:
                break
            await asyncio.sleep(0.05)
        assert st["num_requests"] == 0 and st["num_free_blocks"] == st["num_total_blocks"]
        with pytest.raises(RequestValidationError):
            async for _ in engine.generate(None, [], SamplingParams(), "bad"):
                pass
        await engine.shutdown()

    asyncio.run(go())
