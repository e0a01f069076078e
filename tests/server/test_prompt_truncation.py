"""truncate_prompt_tokens (vLLM's): the last k tokens, a text prompt's BOS kept, bounds checked."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ember.server.errors import APIError
from ember.server.protocol import CompletionRequest
from ember.server.serving_engine import OpenAIServing

BOS = 1


class _CharTokenizer:
    """A token a character; BOS in front where special tokens are added."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS] if add_special_tokens else []) + [ord(c) for c in text]


def _serving(max_model_len: int = 100) -> OpenAIServing:
    serving = OpenAIServing.__new__(OpenAIServing)
    serving.engine = SimpleNamespace(max_model_len=max_model_len)  # type: ignore[assignment]
    serving.tokenizer = _CharTokenizer()  # type: ignore[assignment]
    return serving


def _req(k: int | None) -> CompletionRequest:
    return CompletionRequest(prompt="x", truncate_prompt_tokens=k)


def test_a_text_prompt_keeps_its_bos() -> None:
    ids = _CharTokenizer().encode("hello")
    assert _serving().truncate_prompt(_req(3), "hello", ids, specials_added=True) == (None, [BOS, ord("l"), ord("o")])
    # Too few to keep BOS and text: the last k tokens, as for token ids.
    assert _serving().truncate_prompt(_req(1), "hello", ids, specials_added=True) == (None, [ord("o")])


def test_token_ids_and_short_prompts() -> None:
    ids = [BOS, 10, 11, 12]
    assert _serving().truncate_prompt(_req(2), None, ids) == (None, [11, 12])
    assert _serving().truncate_prompt(_req(4), "abc", ids, specials_added=True) == ("abc", ids)  # nothing to cut
    assert _serving().truncate_prompt(_req(None), "abc", ids) == ("abc", ids)
    assert _serving(3).truncate_prompt(_req(-1), None, ids) == (None, [10, 11, 12])  # -1: the context length


@pytest.mark.parametrize("k", [0, 101])
def test_out_of_range(k: int) -> None:
    with pytest.raises(APIError) as e:
        _serving().truncate_prompt(_req(k), None, [1, 2, 3])
    assert e.value.status_code == 400 and e.value.param == "truncate_prompt_tokens"
