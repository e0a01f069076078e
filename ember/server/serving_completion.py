"""POST /v1/completions: an engine request per prompt; choice index = prompt index * n + output index."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from ember.outputs import PositionLogprobs, RequestOutput
from ember.server.errors import bad_request, to_api_error
from ember.server.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from ember.server.serving_engine import OpenAIServing, random_id
from ember.server.streaming import (
    SSE_DONE,
    Generation,
    SSEResponse,
    cancel_on_disconnect,
    close_all,
    merge,
    sse,
    start_all,
)


def _extend(into: CompletionLogprobs, part: CompletionLogprobs) -> None:
    into.tokens += part.tokens
    into.token_logprobs += part.token_logprobs
    into.top_logprobs += part.top_logprobs
    into.text_offset += part.text_offset


def _usage(gens: list[Generation], completion_tokens: int) -> UsageInfo:
    # Each prompt counts once however many choices it has (n), as in OpenAI's and vLLM's usage.
    prompt_tokens = sum(len(g.prompt_token_ids) for g in gens)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, req: CompletionRequest, raw: Request) -> CompletionResponse | Response:
        model = self.resolve_model(req.model)
        prompts = self._prompts(req)
        # echo + logprobs reports the prompt's own logprobs too, which the engine computes only when asked.
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
        if req.prompt_logprobs is not None:  # vLLM's: the same scores, reported on their own
            prompt_logprobs = max(prompt_logprobs or 0, req.prompt_logprobs)
        params = self.sampling_params(req, max_tokens=req.max_tokens, logprobs=req.logprobs,
                                      prompt_logprobs=prompt_logprobs,
                                      structured_output=await self.structured.constraint(req))
        base_id = random_id("cmpl")
        # A copy of the params per prompt: the engine resolves max_tokens=None per request, in place.
        gens = [Generation(self.engine, base_id if len(prompts) == 1 else f"{base_id}-{i}", text, ids,
                           params.clone()) for i, (text, ids) in enumerate(prompts)]
        if req.stream:
            try:
                await cancel_on_disconnect(raw, start_all(gens))
            except BaseException:
                await close_all(gens)
                raise
            return SSEResponse(self._stream(base_id, gens, req, model), on_close=lambda: close_all(gens))
        try:
            return await cancel_on_disconnect(raw, self._complete(base_id, gens, req, model))
        finally:
            await close_all(gens)

    def _prompts(self, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        """(text or None, token ids) per prompt, from a string, strings, token ids or lists of token ids."""
        p = req.prompt
        if isinstance(p, str):
            items: list[str | list[int]] = [p]
        elif not p:
            raise bad_request("prompt must not be empty", "prompt")
        elif isinstance(p[0], int):
            items = [p]  # type: ignore[list-item]
        else:
            items = list(p)  # type: ignore[arg-type]
        out: list[tuple[str | None, list[int]]] = []
        for item in items:
            if isinstance(item, str):
                text: str | None = item
                ids = self.tokenizer.encode(item, add_special_tokens=req.add_special_tokens)
            else:
                text, ids = None, list(item)
                self.check_token_ids(ids, "prompt")
            if not ids:
                raise bad_request("prompt must not be empty", "prompt")
            out.append(self.truncate_prompt(req, text, ids, specials_added=text is not None and req.add_special_tokens))
        return out

    def _echo_text(self, gen: Generation) -> str:
        if gen.prompt is not None:
            return gen.prompt
        return self.tokenizer.decode(gen.prompt_token_ids, skip_special_tokens=False)

    def _prompt_logprobs(self, req: CompletionRequest, gen: Generation,
                         positions: list[PositionLogprobs | None] | None) -> CompletionLogprobs:
        if positions is None:  # the engine did not score the prompt: report the tokens with null logprobs
            positions = [None] * len(gen.prompt_token_ids)
        part, _ = self.logprobs.completion(gen.prompt_token_ids, positions, req.logprobs or 0, 0)
        return part

    async def _complete(self, base_id: str, gens: list[Generation], req: CompletionRequest,
                        model: str) -> CompletionResponse:
        await start_all(gens)
        finals: list[RequestOutput | None] = [None] * len(gens)
        prompt_positions: list[list[PositionLogprobs | None] | None] = [None] * len(gens)
        async for i, out in merge(gens):
            finals[i] = out
            if prompt_positions[i] is None:
                prompt_positions[i] = out.prompt_logprobs
        n = gens[0].params.n
        choices: list[CompletionChoice] = []
        completion_tokens = 0
        for i, (gen, final) in enumerate(zip(gens, finals, strict=True)):
            assert final is not None
            for o in sorted(final.outputs, key=lambda o: o.index):
                completion_tokens += len(o.token_ids)
                prefix = self._echo_text(gen) if req.echo else ""
                logprobs = None
                if req.logprobs is not None:
                    logprobs = CompletionLogprobs()
                    if req.echo:
                        _extend(logprobs, self._prompt_logprobs(req, gen, prompt_positions[i]))
                    part, _ = self.logprobs.completion(o.token_ids, list(o.logprobs or []), req.logprobs,
                                                       len(prefix))
                    _extend(logprobs, part)
                choices.append(CompletionChoice(
                    index=i * n + o.index, text=prefix + o.text, logprobs=logprobs, finish_reason=o.finish_reason,
                    stop_reason=o.stop_reason,
                    prompt_logprobs=None if req.prompt_logprobs is None else self.logprobs.prompt(
                        gen.prompt_token_ids, prompt_positions[i], req.prompt_logprobs)))
        return CompletionResponse(id=base_id, model=model, choices=choices,
                                  usage=_usage(gens, completion_tokens))

    async def _stream(self, base_id: str, gens: list[Generation], req: CompletionRequest,
                      model: str) -> AsyncIterator[str]:
        created = int(time.time())
        extra = {"usage": None} if req.include_usage else {}
        n = gens[0].params.n
        offsets: dict[int, int] = {}  # choice index -> characters sent so far (the next token's text_offset)
        finished: set[int] = set()
        completion_tokens: dict[int, int] = {}
        try:
            async for i, out in merge(gens):
                for o in out.outputs:
                    index = i * n + o.index
                    if index in finished:
                        continue
                    if (req.echo and req.logprobs is not None and index not in offsets and not o.finished
                            and len(out.prompt_logprobs or ()) < len(gens[i].prompt_token_ids)):
                        continue  # a prompt prefilled in chunks: its echo waits for the scores of every chunk
                    completion_tokens[index] = len(o.token_ids)
                    text, logprobs = o.delta_text, None
                    offset = offsets.get(index)
                    if req.logprobs is not None:
                        logprobs = CompletionLogprobs()
                    if offset is None:  # this choice's first chunk: the echoed prompt goes in front
                        offset = 0
                        if req.echo:
                            prefix = self._echo_text(gens[i])
                            if logprobs is not None:
                                _extend(logprobs, self._prompt_logprobs(req, gens[i], out.prompt_logprobs))
                            text, offset = prefix + text, len(prefix)
                    if logprobs is not None and o.delta_token_ids:
                        part, _ = self.logprobs.completion(o.delta_token_ids, list(o.delta_logprobs or []),
                                                           req.logprobs or 0, offset)
                        _extend(logprobs, part)
                    offsets[index] = offset + len(o.delta_text)
                    if not text and not (logprobs and logprobs.tokens) and not o.finished:
                        continue  # nothing visible yet (text held back by the detokenizer)
                    if o.finished:
                        finished.add(index)
                    choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                                              finish_reason=o.finish_reason)
                    if o.finished:
                        choice.stop_reason = o.stop_reason
                    yield sse(CompletionChunk(id=base_id, object="text_completion", created=created,
                                              model=model, choices=[choice], **extra), exclude_unset=True)
            if req.include_usage:
                yield sse(CompletionChunk(id=base_id, object="text_completion", created=created, model=model,
                                          choices=[], usage=_usage(gens, sum(completion_tokens.values()))),
                          exclude_unset=True)
        except Exception as e:  # the stream has begun: the error becomes an event (the SDK raises it)
            yield sse(to_api_error(e).to_response())
        yield SSE_DONE
