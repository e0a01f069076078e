"""Sampling through the whole engine: seeds, stops, lengths, n, penalties, aborts."""

from __future__ import annotations

import pytest

from ember import SamplingParams
from ember.engine.errors import RequestValidationError


def _ids(llm, text):
    return llm.tokenizer.encode(text)


def test_seeded_sampling_independent_of_batch(smol_llm):
    p = _ids(smol_llm, "My favourite food is")
    seeded = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    alone = smol_llm.generate(prompt_token_ids=[p], sampling_params=seeded)[0].outputs[0].token_ids
    others = [_ids(smol_llm, t) for t in ("Tell me a story", "Numbers: 1 2 3", "Why is the sky blue?")]
    params = [SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True)] * 3
    outs = smol_llm.generate(prompt_token_ids=others[:2] + [p] + others[2:],
                             sampling_params=params[:2] + [seeded] + params[2:])
    assert outs[2].outputs[0].token_ids == alone
    different = smol_llm.generate(prompt_token_ids=[p], sampling_params=seeded.clone(seed=99))[0]
    assert different.outputs[0].token_ids != alone


def test_n_sequences_differ_and_are_reproducible(smol_llm):
    p = _ids(smol_llm, "The weather today is")
    sp = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    a = smol_llm.generate(prompt_token_ids=[p], sampling_params=sp)[0]
    b = smol_llm.generate(prompt_token_ids=[p], sampling_params=sp)[0]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1
    assert all(len(o.token_ids) == 10 and o.finish_reason == "length" for o in a.outputs)


def test_max_tokens_and_min_tokens(smol_llm):
    chat = [{"role": "user", "content": "Say hi."}]
    short = smol_llm.chat(chat, SamplingParams(temperature=0, max_tokens=200))[0].outputs[0]
    assert short.finish_reason == "stop" and len(short.token_ids) < 200
    forced = smol_llm.chat(chat, SamplingParams(temperature=0, max_tokens=200,
                                                min_tokens=len(short.token_ids) + 5))[0].outputs[0]
    assert len(forced.token_ids) >= len(short.token_ids) + 5
    capped = smol_llm.chat(chat, SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    assert len(capped.token_ids) == 3 and capped.finish_reason == "length"


def test_stop_strings_never_leak(smol_llm):
    p = _ids(smol_llm, "Count: 1, 2, 3, 4, 5,")
    base = smol_llm.generate(prompt_token_ids=[p], sampling_params=SamplingParams(
        temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0].text
    assert " 8" in base
    out = smol_llm.generate(prompt_token_ids=[p], sampling_params=SamplingParams(
        temperature=0, max_tokens=20, stop=[" 8", "zzz"], ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == " 8"
    assert out.text == base[:base.index(" 8")]
    # A stop string spanning two tokens (", 7" is ',' then ' 7') is caught as well.
    out = smol_llm.generate(prompt_token_ids=[p], sampling_params=SamplingParams(
        temperature=0, max_tokens=20, stop=[", 7"], include_stop_str_in_output=True))[0].outputs[0]
    assert out.text == base[:base.index(", 7") + 3]


def test_stop_token_ids(smol_llm):
    p = _ids(smol_llm, "Count: 1, 2, 3, 4, 5,")
    full = smol_llm.generate(prompt_token_ids=[p], sampling_params=SamplingParams(
        temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    stop_tok = full.token_ids[3]
    out = smol_llm.generate(prompt_token_ids=[p], sampling_params=SamplingParams(
        temperature=0, max_tokens=10, stop_token_ids=[stop_tok]))[0].outputs[0]
    assert out.token_ids == full.token_ids[:full.token_ids.index(stop_tok) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok


def test_penalties_and_logit_bias_change_output(smol_llm):
    p = _ids(smol_llm, "Repeat after me: la la la la la")
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    base = smol_llm.generate(prompt_token_ids=[p], sampling_params=greedy)[0].outputs[0].token_ids
    # (presence_penalty is a flat -2 that does not outweigh this prompt's pull; tests/sampling checks its math)
    for changes in ({"repetition_penalty": 1.8}, {"frequency_penalty": 2.0}):
        out = smol_llm.generate(prompt_token_ids=[p], sampling_params=greedy.clone(**changes))[0]
        assert out.outputs[0].token_ids != base, changes
    banned = base[0]
    out = smol_llm.generate(prompt_token_ids=[p], sampling_params=greedy.clone(logit_bias={banned: -100}))[0]
    assert banned not in out.outputs[0].token_ids
    forced = smol_llm.generate(prompt_token_ids=[p], sampling_params=greedy.clone(logit_bias={42: 100}))[0]
    assert set(forced.outputs[0].token_ids) == {42}


def test_overlength_and_invalid_requests_rejected(smol_llm):
    eng = smol_llm.engine
    with pytest.raises(RequestValidationError, match="maximum context length"):
        eng.add_request("too-long", None, [1] * (eng.max_model_len - 5), SamplingParams(max_tokens=10))
    with pytest.raises(RequestValidationError, match="maximum context length"):
        eng.add_request("too-long2", None, [1] * eng.max_model_len, SamplingParams(max_tokens=None))
    with pytest.raises(RequestValidationError, match="empty"):
        eng.add_request("empty", None, [], SamplingParams())
    with pytest.raises(RequestValidationError, match="token ids"):
        eng.add_request("oov", None, [1, 10**9], SamplingParams())
    with pytest.raises(RequestValidationError, match="vocabulary"):
        eng.add_request("bias", None, [1, 2], SamplingParams(logit_bias={10**9: 1.0}))
    assert not eng.has_unfinished_requests()


def test_abort_frees_blocks(smol_llm):
    eng = smol_llm.engine
    p = _ids(smol_llm, "Write a very long essay about the ocean.")
    eng.add_request("to-abort", None, p, SamplingParams(n=2, max_tokens=100, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.block_manager.num_free_blocks < eng.block_manager.num_blocks
    eng.abort_request("to-abort")
    outs = eng.step()
    assert [o.finished for o in outs] == [True]
    assert {c.finish_reason for c in outs[0].outputs} == {"abort"}
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert not eng.has_unfinished_requests()


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"n": 0}, "n"), ({"max_tokens": -1}, "max_tokens"), ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"logprobs": 50}, "logprobs"),
    ({"temperature": float("nan")}, "temperature"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"5": 200}}, "logit_bias"),
    ({"stop": [""]}, "stop"), ({"repetition_penalty": 0}, "repetition_penalty"),
])
def test_invalid_sampling_params(kwargs, param):
    from ember.sampling_params import SamplingParamsError

    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param
