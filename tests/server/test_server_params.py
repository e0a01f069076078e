"""Every OpenAI / vLLM request field lands in the engine's SamplingParams under the right name and value.

The generation tests show the effect of a few of them end to end; this checks the mapping of all of them, which
is cheap (the engine's own tests cover what each parameter does to sampling)."""

from __future__ import annotations

from typing import Any

import pytest

from ember.sampling_params import SamplingParams
from ember.server.errors import APIError
from ember.server.protocol import ChatCompletionRequest, CompletionRequest
from ember.server.serving_engine import OpenAIServing

MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def serving(live_server: Any) -> OpenAIServing:
    return OpenAIServing(live_server.engine, ["m", "alias"])


def test_every_sampling_field_is_mapped(serving: OpenAIServing) -> None:
    req = ChatCompletionRequest.model_validate({
        "messages": MSGS, "n": 3, "temperature": 0.7, "top_p": 0.9, "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "logit_bias": {"42": 5.5}, "seed": 11, "stop": ["a", "b"], "top_k": 40,
        "min_p": 0.05, "repetition_penalty": 1.3, "ignore_eos": True, "min_tokens": 2, "stop_token_ids": [7],
        "skip_special_tokens": False, "spaces_between_special_tokens": False,
        "include_stop_str_in_output": True})
    p = serving.sampling_params(req, max_tokens=9, logprobs=4, prompt_logprobs=1)
    expected = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=11, presence_penalty=0.5,
                              frequency_penalty=-0.5, repetition_penalty=1.3, logit_bias={42: 5.5}, stop=["a", "b"],
                              stop_token_ids=[7], include_stop_str_in_output=True, ignore_eos=True, max_tokens=9,
                              min_tokens=2, logprobs=4, prompt_logprobs=1, skip_special_tokens=False,
                              spaces_between_special_tokens=False)
    assert p == expected


def test_defaults_are_openai_defaults(serving: OpenAIServing) -> None:
    chat = ChatCompletionRequest.model_validate({"messages": MSGS})
    p = serving.sampling_params(chat, max_tokens=None, logprobs=None)
    assert p == SamplingParams(max_tokens=None)  # temperature 1, top_p 1, no top-k, the rest of the context
    comp = CompletionRequest.model_validate({"prompt": "x"})
    assert comp.max_tokens == 16
    assert serving.sampling_params(comp, max_tokens=comp.max_tokens, logprobs=None).max_tokens == 16
    assert serving.sampling_params(
        ChatCompletionRequest.model_validate({"messages": MSGS, "stop": "x", "top_k": -1}),
        max_tokens=None, logprobs=None).stop == ["x"]


def test_model_names(serving: OpenAIServing) -> None:
    assert serving.resolve_model(None) == "m"
    assert serving.resolve_model("alias") == "alias"
    with pytest.raises(APIError) as exc:
        serving.resolve_model("M")  # names are exact, as in vLLM
    assert exc.value.status_code == 404 and exc.value.code == "model_not_found"
