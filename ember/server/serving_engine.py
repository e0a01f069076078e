"""What the chat, completion and tokenizer endpoints share: model names, prompts, sampling parameters."""

from __future__ import annotations

import uuid
from typing import Any

import jinja2

from ember.sampling_params import SamplingParams, SamplingParamsError
from ember.server.engine_client import EngineClient
from ember.server.errors import APIError, bad_request, to_api_error
from ember.server.logprobs import LogprobFormatter
from ember.server.protocol import ChatMessage, SamplingFields, chat_messages_for_template
from ember.server.serving_tools import StructuredServing


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIServing:
    def __init__(self, engine: EngineClient, served_model_names: list[str], tool_call_parser: str = "auto") -> None:
        if not served_model_names:
            raise ValueError("at least one served model name is needed")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        # The model's vocabulary, which may be larger than the tokenizer's (padded embeddings, dummy weights).
        self.vocab_size = engine.vocab_size
        self.served_model_names = served_model_names
        self.logprobs = LogprobFormatter(engine.tokenizer)
        self.structured = StructuredServing(engine.tokenizer, tool_call_parser)

    def resolve_model(self, requested: str | None) -> str:
        """The name to echo in the response: the one asked for if it is served (an alias stays an alias, as in
        vLLM), the canonical one when none was given."""
        if requested is None:
            return self.served_model_names[0]
        if requested in self.served_model_names:
            return requested
        raise APIError(404, f"The model `{requested}` does not exist.", param="model", code="model_not_found")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is out of the vocabulary (size {vocab})", param)

    def truncate_prompt(self, req: SamplingFields, text: str | None, ids: list[int],
                        specials_added: bool = False) -> tuple[str | None, list[int]]:
        """vLLM's truncate_prompt_tokens: the prompt's last k tokens. Where the tokenizer added special tokens to a
        text prompt (`specials_added`: a BOS), those stay and the text's tokens are cut, as a tokenizer
        truncating from the left does. The text goes with the cut: an echo or a log decodes the tokens kept."""
        k = req.truncate_prompt_tokens
        if k is None:
            return text, ids
        limit = self.engine.max_model_len
        if k == -1:
            k = limit
        if not 1 <= k <= limit:
            raise bad_request(f"truncate_prompt_tokens must be -1 or from 1 to the context length ({limit}), "
                              f"got {k}", "truncate_prompt_tokens")
        if len(ids) <= k:
            return text, ids
        if specials_added and text is not None:
            plain = self.tokenizer.encode(text, add_special_tokens=False)
            extra = len(ids) - len(plain)  # the special tokens around the text's own
            start = next((p for p in range(extra + 1) if ids[p:p + len(plain)] == plain), None)
            if 0 < extra < k and start is not None:
                return None, ids[:start] + plain[len(plain) - (k - extra):] + ids[start + len(plain):]
        return None, ids[-k:]

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool,
                    tools: list[dict[str, Any]] | None = None,
                    chat_template: str | None = None) -> tuple[str, list[int]]:
        """The chat template's prompt text and its token ids (the template placed the special tokens)."""
        try:
            text = self.tokenizer.apply_chat_template(chat_messages_for_template(messages),
                                                      add_generation_prompt=add_generation_prompt, tools=tools,
                                                      chat_template=chat_template)
        except (jinja2.TemplateError, ValueError, TypeError) as e:  # e.g. a template enforcing alternation
            raise bad_request(f"the chat template could not render these messages: {e}", "messages") from e
        return text, self.tokenizer.encode(text, add_special_tokens=False)

    def sampling_params(self, req: SamplingFields, *, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None, structured_output: Any = None) -> SamplingParams:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            params = SamplingParams(
                n=req.n,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=0 if req.top_k is None else req.top_k,
                min_p=0.0 if req.min_p is None else req.min_p,
                seed=req.seed,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                # SamplingParams turns the string keys into token ids (and rejects those that are not).
                logit_bias=dict(req.logit_bias) if req.logit_bias else None,  # type: ignore[arg-type]
                stop=stop,
                stop_token_ids=list(req.stop_token_ids or []),
                include_stop_str_in_output=req.include_stop_str_in_output,
                ignore_eos=req.ignore_eos,
                max_tokens=max_tokens,
                min_tokens=req.min_tokens,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=req.skip_special_tokens,
                spaces_between_special_tokens=req.spaces_between_special_tokens,
                structured_output=structured_output,
            )
            params.check_vocab(self.vocab_size)
        except SamplingParamsError as e:
            raise to_api_error(e) from e
        return params
