"""POST /v1/chat/completions: messages through the chat template into the engine; results in OpenAI shapes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ember.outputs import CompletionOutput, PositionLogprobs
from ember.server.errors import to_api_error
from ember.server.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    UsageInfo,
)
from ember.server.serving_engine import OpenAIServing, random_id
from ember.server.serving_tools import ChatPlan, ToolCallStream, finish_reason, tool_calls_of
from ember.server.streaming import SSE_DONE, Generation, SSEResponse, cancel_on_disconnect, sse


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, req: ChatCompletionRequest,
                                     raw: Request) -> ChatCompletionResponse | Response:
        model = self.resolve_model(req.model)
        plan = await self.structured.chat_plan(req)
        prompt, prompt_ids = self.render_chat(req.messages, req.add_generation_prompt, plan.template_tools,
                                              plan.chat_template)
        prompt, prompt_ids = self.truncate_prompt(req, prompt, prompt_ids)
        # max_completion_tokens replaced max_tokens in OpenAI's API; either works, the newer one wins.
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = self.sampling_params(req, max_tokens=max_tokens,
                                      logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                                      prompt_logprobs=req.prompt_logprobs,
                                      structured_output=plan.structured_output)
        request_id = random_id("chatcmpl")
        gen = Generation(self.engine, request_id, prompt, prompt_ids, params)
        if req.stream:
            try:
                await cancel_on_disconnect(raw, gen.start())
            except BaseException:
                await gen.close()
                raise
            return SSEResponse(self._stream(gen, req, model, plan), on_close=gen.close)
        try:
            return await cancel_on_disconnect(raw, self._complete(gen, req, model, plan))
        finally:
            await gen.close()

    def _logprobs(self, req: ChatCompletionRequest, token_ids: list[int],
                  positions: list[PositionLogprobs] | None) -> ChatLogprobs | None:
        if not req.logprobs:
            return None
        return ChatLogprobs(content=self.logprobs.chat(token_ids, positions or [], req.top_logprobs or 0))

    async def _complete(self, gen: Generation, req: ChatCompletionRequest, model: str,
                        plan: ChatPlan) -> ChatCompletionResponse:
        await gen.start()
        last = None
        prompt_positions = None
        async for out in gen:
            last = out
            prompt_positions = prompt_positions or out.prompt_logprobs
        assert last is not None
        choices = []
        for o in sorted(last.outputs, key=lambda o: o.index):
            message = self._message(o, plan)
            choices.append(ChatCompletionChoice(
                index=o.index, message=message, logprobs=self._logprobs(req, o.token_ids, o.logprobs),
                finish_reason=finish_reason(o.finish_reason, bool(message.tool_calls)), stop_reason=o.stop_reason))
        completion_tokens = sum(len(o.token_ids) for o in last.outputs)
        usage = UsageInfo(prompt_tokens=len(gen.prompt_token_ids), completion_tokens=completion_tokens,
                          total_tokens=len(gen.prompt_token_ids) + completion_tokens)
        prompt_logprobs = None if req.prompt_logprobs is None else self.logprobs.prompt(
            gen.prompt_token_ids, prompt_positions, req.prompt_logprobs)
        return ChatCompletionResponse(id=gen.request_id, model=model, choices=choices, usage=usage,
                                      prompt_logprobs=prompt_logprobs)

    @staticmethod
    def _message(o: CompletionOutput, plan: ChatPlan) -> ChatResponseMessage:
        if plan.parser is None:
            return ChatResponseMessage(content=o.text)
        ex = plan.parser.extract(o.text)
        return ChatResponseMessage(content=ex.content, tool_calls=tool_calls_of(ex))

    async def _stream(self, gen: Generation, req: ChatCompletionRequest, model: str,
                      plan: ChatPlan) -> AsyncIterator[str]:
        created = int(time.time())
        # With include_usage every chunk carries "usage": null and a last chunk with no choices the totals.
        extra = {"usage": None} if req.include_usage else {}

        def chunk(choice: ChatCompletionStreamChoice) -> str:
            return sse(ChatCompletionChunk(id=gen.request_id, object="chat.completion.chunk", created=created,
                                           model=model, choices=[choice], **extra), exclude_unset=True)

        n = gen.params.n
        finished = [False] * n
        completion_tokens = [0] * n
        tool_streams = [ToolCallStream(plan.parser) if plan.parser is not None else None for _ in range(n)]
        try:
            for i in range(n):
                yield chunk(ChatCompletionStreamChoice(index=i, delta=ChatDelta(role="assistant", content=""),
                                                       logprobs=None, finish_reason=None))
            async for out in gen:
                for o in out.outputs:
                    if finished[o.index]:
                        continue
                    completion_tokens[o.index] = len(o.token_ids)
                    choice = self._delta_choice(req, o, tool_streams[o.index])
                    if choice is not None:
                        finished[o.index] = o.finished
                        yield chunk(choice)
            if req.include_usage:
                prompt_tokens = len(gen.prompt_token_ids)
                usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=sum(completion_tokens),
                                  total_tokens=prompt_tokens + sum(completion_tokens))
                yield sse(ChatCompletionChunk(id=gen.request_id, object="chat.completion.chunk",
                                              created=created, model=model, choices=[], usage=usage),
                          exclude_unset=True)
        except Exception as e:  # the stream has begun: the error becomes an event (the SDK raises it)
            yield sse(to_api_error(e).to_response())
        yield SSE_DONE

    def _delta_choice(self, req: ChatCompletionRequest, o: CompletionOutput,
                      tools: ToolCallStream | None) -> ChatCompletionStreamChoice | None:
        """The chunk choice for what one output added, or None when it added nothing visible (the detokenizer
        may hold text back, e.g. a possible stop string's prefix or half a UTF-8 character; a tool parser, text
        that may be a call's beginning)."""
        logprobs = self._logprobs(req, o.delta_token_ids, o.delta_logprobs) if o.delta_token_ids else None
        content, calls = (o.delta_text, []) if tools is None else tools.feed(o.delta_text, o.finished)
        if not content and not calls and logprobs is None and not o.finished:
            return None
        fields: dict[str, Any] = {"content": content} if content else {}
        if calls:
            fields["tool_calls"] = calls
        delta = ChatDelta(**fields)  # only what changed is set, so only that is sent
        reason = finish_reason(o.finish_reason, tools is not None and tools.has_calls)
        choice = ChatCompletionStreamChoice(index=o.index, delta=delta, logprobs=logprobs, finish_reason=reason)
        if o.finished:
            choice.stop_reason = o.stop_reason
        return choice
