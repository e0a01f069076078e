"""POST /v1/completions through the official openai SDK against the live server."""

from __future__ import annotations

import httpx
import openai

from ember.config import EMBEDDED_MODEL

MODEL = EMBEDDED_MODEL
PROMPT = "The capital of France is"
GREEDY = {"temperature": 0, "max_tokens": 5, "extra_body": {"ignore_eos": True}}


def _ids(http: httpx.Client, text: str) -> list[int]:
    return http.post("/tokenize", json={"prompt": text}).json()["tokens"]


def test_completion_basic(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY)
    assert r.id.startswith("cmpl-")
    assert r.object == "text_completion"
    assert r.model == MODEL
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 5


def test_completion_default_max_tokens_is_16(client: openai.OpenAI) -> None:
    r = client.completions.create(model="llm", prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert r.model == "llm"
    assert r.usage is not None and r.usage.completion_tokens == 16


def test_completion_stream_matches_non_stream(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert {c.object for c in chunks} == {"text_completion"}
    assert len({c.id for c in chunks}) == 1
    assert "".join(ch.text for c in chunks for ch in c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()  # type: ignore[union-attr]
    finals = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finals == ["length"]


def test_completion_token_id_prompts(client: openai.OpenAI, http: httpx.Client) -> None:
    ids = _ids(http, PROMPT)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY)
    by_ids = client.completions.create(model=MODEL, prompt=ids, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(ids)
    # A list of token-id lists is a batch of prompts.
    other = _ids(http, "One, two, three,")
    batch = client.completions.create(model=MODEL, prompt=[ids, other], **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text
    assert batch.usage is not None and batch.usage.prompt_tokens == len(ids) + len(other)


def test_completion_batch_times_n_indices(client: openai.OpenAI) -> None:
    """OpenAI numbers choices prompt-major: prompt i's n choices are i*n .. i*n+n-1."""
    prompts = [PROMPT, "One, two, three,"]
    r = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    single = [client.completions.create(model=MODEL, prompt=p, max_tokens=3, temperature=0,
                                        extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    assert [c.text for c in r.choices] == [single[0], single[0], single[1], single[1]]
    assert r.usage is not None and r.usage.completion_tokens == 12
    texts: dict[int, str] = {}
    for chunk in client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=3, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True}):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    assert texts == {c.index: c.text for c in r.choices}


def test_completion_stop_and_seed(client: openai.OpenAI) -> None:
    free = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[3:6]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stop=stop,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == free[: free.index(stop)]
    a, b = (client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=99)
            .choices[0].text for _ in range(2))
    assert a == b


def test_completion_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, logprobs=2, **GREEDY)
    c = r.choices[0]
    lp = c.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs or []) == 5
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset is not None
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs or [], strict=True):
        assert tlp <= 0.0
        assert tok in top and abs(top[tok] - tlp) < 1e-4  # greedy: the chosen token is among the top 2
        assert 1 <= len(top) <= 3  # the top 2, plus the chosen token if it were not among them


def test_completion_echo(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY).choices[0].text
    r = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, **GREEDY)
    assert r.choices[0].text == PROMPT + plain
    streamed = "".join(ch.text for c in client.completions.create(model=MODEL, prompt=PROMPT, echo=True,
                                                                   stream=True, **GREEDY) for ch in c.choices)
    assert streamed == PROMPT + plain


def test_completion_echo_with_logprobs(client: openai.OpenAI, http: httpx.Client) -> None:
    ids = _ids(http, PROMPT)
    r = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, **GREEDY)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert len(lp.tokens) == len(ids) + 5
    # The first prompt token has no context to be scored in: null, as OpenAI reports it.
    assert lp.token_logprobs[0] is None and (lp.top_logprobs or [])[0] is None
    assert all(x is not None and x <= 0.0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens[: len(ids)]) == PROMPT
    assert lp.text_offset is not None and lp.text_offset[len(ids)] == len(PROMPT)
    # Streaming reports the same prompt logprobs in the first chunk.
    with client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, stream=True,
                                   **GREEDY) as stream:
        first = next(iter(stream))
    slp = first.choices[0].logprobs
    assert slp is not None and slp.token_logprobs is not None
    assert slp.token_logprobs[: len(ids)] == lp.token_logprobs[: len(ids)]


def test_completion_max_tokens_0_scores_the_prompt(client: openai.OpenAI, http: httpx.Client) -> None:
    """echo + logprobs + max_tokens 0, as lm-evaluation-harness asks for a loglikelihood: the prompt's own
    logprobs and no new tokens."""
    ids = _ids(http, PROMPT)
    whole = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=2, **GREEDY)
    r = client.completions.create(model=MODEL, prompt=[PROMPT, PROMPT], echo=True, logprobs=2, max_tokens=0,
                                  temperature=0)
    assert r.usage is not None and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == 2 * len(ids)
    for choice in r.choices:
        assert choice.text == PROMPT and choice.finish_reason == "length"
        lp = choice.logprobs
        assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
        assert len(lp.tokens) == len(lp.token_logprobs) == len(ids)
        assert lp.token_logprobs[0] is None
        ref = (whole.choices[0].logprobs.token_logprobs or [])[: len(ids)]  # type: ignore[union-attr]
        assert all(a == b or abs(a - b) < 1e-4 for a, b in zip(lp.token_logprobs[1:], ref[1:], strict=True))
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=2, max_tokens=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.text for c in chunks for ch in c.choices) == PROMPT
    assert [ch.finish_reason for c in chunks for ch in c.choices][-1] == "length"
    assert sum(len(ch.logprobs.tokens or []) for c in chunks for ch in c.choices if ch.logprobs) == len(ids)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 0
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    assert plain.choices[0].text == "" and plain.choices[0].finish_reason == "length"
    # Nothing is generated, so a prompt may take the whole context.
    limit = http.get("/v1/models").json()["data"][0]["max_model_len"]
    fits = client.completions.create(model=MODEL, prompt=[ids[0]] * limit, echo=True, logprobs=0, max_tokens=0)
    assert fits.usage is not None and fits.usage.prompt_tokens == limit and fits.usage.completion_tokens == 0
    assert len(fits.choices[0].logprobs.token_logprobs or []) == limit  # type: ignore[union-attr]
    over = http.post("/v1/completions", json={"prompt": [ids[0]] * (limit + 1), "max_tokens": 0})
    assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded"
    assert over.json()["error"]["param"] == "prompt"
    assert http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0, "min_tokens": 1}).status_code == 400


def test_streamed_echo_logprobs_of_a_prompt_prefilled_in_chunks(client: openai.OpenAI) -> None:
    """Three prompts of 900 tokens share a step budget of 2048 tokens, so the third is prefilled in chunks: its
    streamed echo still carries every prompt position's logprob, the same as without streaming."""
    prompts = [[100 + (j * 7 + k * 13) % 5000 for j in range(900)] for k in range(3)]
    kw = dict(model=MODEL, echo=True, logprobs=1, max_tokens=0)
    alone = client.completions.create(prompt=prompts[2], **kw).choices[0].logprobs  # in one chunk
    want = (alone.token_logprobs or []) if alone else []
    streamed: dict[int, list[float | None]] = {}
    for chunk in client.completions.create(prompt=prompts, **kw, stream=True):
        for ch in chunk.choices:
            streamed.setdefault(ch.index, []).extend((ch.logprobs.token_logprobs or []) if ch.logprobs else [])
    assert sorted(streamed) == [0, 1, 2] and all(len(v) == 900 and v[0] is None for v in streamed.values())
    got = streamed[2]
    assert len(want) == 900 and want[0] is None
    assert all(abs(a - b) < 1e-4 for a, b in zip(got[1:], want[1:], strict=True))  # type: ignore[operator]


def test_truncate_prompt_tokens_keeps_the_last_tokens(client: openai.OpenAI, http: httpx.Client) -> None:
    ids = _ids(http, PROMPT)
    last3 = http.post("/detokenize", json={"tokens": ids[-3:]}).json()["prompt"]
    r = client.completions.create(model=MODEL, prompt=PROMPT, echo=True,
                                  **{**GREEDY, "extra_body": {"ignore_eos": True, "truncate_prompt_tokens": 3}})
    assert r.usage is not None and r.usage.prompt_tokens == 3
    assert r.choices[0].text.startswith(last3)
    same = client.completions.create(model=MODEL, prompt=ids[-3:], **GREEDY)
    assert r.choices[0].text == last3 + same.choices[0].text
    # A prompt longer than the context fits once cut; a short one is left alone.
    long = client.completions.create(model=MODEL, prompt=[ids[0]] * 5000, max_tokens=2,
                                     extra_body={"truncate_prompt_tokens": 8})
    assert long.usage is not None and long.usage.prompt_tokens == 8
    short = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1,
                                      extra_body={"truncate_prompt_tokens": 1000})
    assert short.usage is not None and short.usage.prompt_tokens == len(ids)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi there"}],
                                          max_tokens=1, extra_body={"truncate_prompt_tokens": 4})
    assert chat.usage is not None and chat.usage.prompt_tokens == 4
    bad = http.post("/v1/completions", json={"prompt": PROMPT, "truncate_prompt_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "truncate_prompt_tokens"


def test_prompt_logprobs_vllm_extra(client: openai.OpenAI, http: httpx.Client) -> None:
    """vLLM's prompt_logprobs: per prompt token {token id: {logprob, rank, decoded_token}}, the token itself and
    the k most likely there; the first position null. The same scores as echo's."""
    ids = _ids(http, PROMPT)
    echo = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    ref = echo.choices[0].logprobs.token_logprobs  # type: ignore[union-attr]
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "prompt_logprobs": 2}).json()
    plp = r["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for j in range(1, len(ids)):
        entry = plp[j]
        assert str(ids[j]) in entry and 2 <= len(entry) <= 3
        assert abs(entry[str(ids[j])]["logprob"] - ref[j]) < 1e-4  # type: ignore[index]
        ranks = sorted(e["rank"] for e in entry.values())
        assert ranks[:2] == [1, 2] and all(isinstance(e["decoded_token"], str) for e in entry.values())
    plain = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1}).json()
    assert plain["choices"][0]["prompt_logprobs"] is None
    chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                   "max_tokens": 1, "prompt_logprobs": 0}).json()
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] and chat["prompt_logprobs"][0] is None
    assert all(len(p) == 1 for p in chat["prompt_logprobs"][1:])  # k = 0: the prompt token alone
    bad = http.post("/v1/completions", json={"prompt": PROMPT, "prompt_logprobs": 1, "stream": True})
    assert bad.status_code == 400
