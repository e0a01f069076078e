"""POST /v1/chat/completions through the official openai SDK against the live server."""

from __future__ import annotations

import httpx
import openai

from ember.config import EMBEDDED_MODEL

MODEL = EMBEDDED_MODEL
HELLO = [{"role": "user", "content": "Say hello."}]


def test_chat_basic(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert r.model == MODEL
    assert r.created > 0
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0
    assert c.message.role == "assistant"
    assert c.message.content
    assert c.finish_reason in ("stop", "length")
    assert r.usage is not None
    assert r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # The prompt went through the chat template: more tokens than the bare text, SmolLM's default system included.
    assert r.usage.prompt_tokens > 20


def test_chat_alias_llm_is_echoed(client: openai.OpenAI) -> None:
    canonical = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0)
    alias = client.chat.completions.create(model="llm", messages=HELLO, max_tokens=6, temperature=0)
    assert alias.model == "llm"
    assert alias.choices[0].message.content == canonical.choices[0].message.content


def test_chat_stream_shape(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0,
                                                 stream=True))
    assert len(chunks) >= 3
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.index == 0
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    assert streamed == whole.choices[0].message.content


def test_chat_stream_include_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_n_choices(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, n=3, temperature=1.0, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.message.content for c in r.choices)
    assert r.usage is not None and 3 <= r.usage.completion_tokens <= 18  # all three choices counted
    stream = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, n=3, stream=True,
                                                 temperature=1.0, seed=3))
    texts = {i: "" for i in range(3)}
    roles, finishes = set(), set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.delta.role:
                roles.add(c.index)
            if c.finish_reason:
                finishes.add(c.index)
    assert roles == finishes == {0, 1, 2}
    # Same seed, same sampling: the streamed choices are the non-streamed ones.
    assert texts == {c.index: c.message.content for c in r.choices}


def test_chat_seed_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell a story."}],
                                           max_tokens=12, temperature=1.0, seed=seed)
        return r.choices[0].message.content or ""

    a, b = sample(1234), sample(1234)
    assert a == b
    others = {sample(s) for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds always gave the same text: the seed is not reaching sampling"


def test_chat_stop_string(client: openai.OpenAI) -> None:
    free = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
    text = free.choices[0].message.content or ""
    assert len(text) > 4
    stop = text[2:5]  # a string that certainly occurs in the greedy continuation
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0, stop=[stop],
                                       extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.finish_reason == "stop"
    assert c.message.content == text[: text.index(stop)]
    assert c.model_extra is not None and c.model_extra.get("stop_reason") == stop


def test_chat_max_completion_tokens_and_ignore_eos(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=7, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 7


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content is not None
    assert len(lp.content) == 5
    assert "".join(t.token for t in lp.content) == r.choices[0].message.content
    for t in lp.content:
        assert t.logprob <= 0.0
        assert bytes(t.bytes or []).decode("utf-8", errors="replace") == t.token
        assert len(t.top_logprobs) == 3
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert t.top_logprobs[0].token == t.token
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4


def test_chat_logprobs_stream(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0,
                                                 logprobs=True, stream=True, extra_body={"ignore_eos": True}))
    entries = [t for c in chunks for ch in c.choices if ch.logprobs and ch.logprobs.content
               for t in ch.logprobs.content]
    assert len(entries) == 4
    assert all(t.top_logprobs == [] for t in entries)  # logprobs without top_logprobs: none listed
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert "".join(t.token for t in entries) == text


def test_chat_sampling_extras_reach_the_engine(client: openai.OpenAI, http: httpx.Client) -> None:
    """vLLM's extras and OpenAI's logit_bias, each with an effect that shows in the output."""
    token = http.post("/tokenize", json={"prompt": " banana", "add_special_tokens": False}).json()["tokens"][0]
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0,
                                       logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == http.post("/detokenize", json={"tokens": [token] * 4}).json()["prompt"]
    # stop_token_ids: stopping on the biased token ends at once with that token as the stop reason.
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0,
                                       logit_bias={str(token): 100}, extra_body={"stop_token_ids": [token]})
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.message.content == ""
    assert c.model_extra is not None and c.model_extra.get("stop_reason") == token
    # min_tokens with a bias towards EOS: EOS is suppressed until min_tokens are out.
    eos = 2  # <|im_end|>
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0,
                                       logit_bias={str(eos): 100}, extra_body={"min_tokens": 3})
    assert r.usage is not None and r.usage.completion_tokens == 4  # 3 forced tokens, then the EOS
    assert r.choices[0].finish_reason == "stop"
    # Accepted and valid together: top_k, top_p, min_p, penalties, repetition_penalty, skip_special_tokens.
    r = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=6, temperature=0.7, top_p=0.9, seed=5, presence_penalty=0.5,
        frequency_penalty=0.5, extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2,
                                           "skip_special_tokens": True, "include_stop_str_in_output": False})
    assert r.choices[0].message.content


def test_chat_developer_role_and_content_parts(client: openai.OpenAI) -> None:
    as_system = client.chat.completions.create(
        model=MODEL, max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}])
    as_dev = client.chat.completions.create(
        model=MODEL, max_tokens=6, temperature=0,
        messages=[{"role": "developer", "content": [{"type": "text", "text": "You are "},
                                                    {"type": "text", "text": "terse."}]},
                  {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert as_dev.choices[0].message.content == as_system.choices[0].message.content
    assert as_dev.usage is not None and as_system.usage is not None
    assert as_dev.usage.prompt_tokens == as_system.usage.prompt_tokens
