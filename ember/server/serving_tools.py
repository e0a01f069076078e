"""The HTTP side of structured outputs and tool calling (the machinery is ember.structured).

Requests: `response_format` / vLLM's `structured_outputs` compile to the grammar a request's sampling obeys;
`tools` + `tool_choice` decide the chat template, a forcing grammar and the parser that turns output into
`message.tool_calls` (or streamed `delta.tool_calls`). Every problem is a 400 naming the field; compilation runs
off the event loop (a large schema takes milliseconds, the first one also converts the tokenizer).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ember.sampling.grammar import GrammarSpec
from ember.server.errors import APIError, bad_request
from ember.server.protocol import (
    ChatCompletionRequest,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    SamplingFields,
    ToolCall,
)
from ember.structured import (
    StructuredOutputError,
    StructuredOutputs,
    ToolParser,
    get_compiler,
    parse_tools,
    plan_tools,
)
from ember.structured.chat_template import detect_tool_parser, tool_template_for
from ember.structured.tool_parsers import TOOL_PARSERS, ExtractedToolCalls, StreamDelta, ToolStreamer
from ember.tokenizer import Tokenizer


def structured_outputs_of(req: SamplingFields) -> StructuredOutputs | None:
    """The constraint a request asks for, or None (response_format text, or nothing)."""
    rf, so = req.response_format, req.structured_outputs
    if rf is not None and rf.type != "text" and so is not None:
        raise bad_request("use either response_format or structured_outputs, not both", "structured_outputs")
    try:
        if so is not None:
            return StructuredOutputs(json=so.json_, json_object=so.json_object, regex=so.regex, choice=so.choice,
                                     grammar=so.grammar, disable_any_whitespace=so.disable_any_whitespace)
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object":
            return StructuredOutputs(json_object=True)
        assert rf.json_schema is not None
        schema = rf.json_schema.schema_
        return StructuredOutputs(json=schema) if schema is not None else StructuredOutputs(json_object=True)
    except StructuredOutputError as e:
        raise _api_error(e, "structured_outputs" if so is not None else "response_format") from None


def _api_error(e: StructuredOutputError, default_param: str) -> APIError:
    param = e.param or default_param
    if default_param == "response_format" and e.kind == "json":
        param = "response_format.json_schema.schema"
    return bad_request(f"unsupported or invalid {e.kind} constraint: {e.problem}", param)


@dataclass
class ChatPlan:
    structured_output: GrammarSpec | None
    template_tools: list[dict[str, Any]] | None  # what the chat template is given as `tools`
    chat_template: str | None  # None: the model's own
    parser: ToolParser | None  # reads tool calls out of the output; None: plain content


class StructuredServing:
    def __init__(self, tokenizer: Tokenizer, tool_call_parser: str = "auto") -> None:
        """`tool_call_parser`: "auto" reads the format off the template that renders tools; a name from
        TOOL_PARSERS (`--tool-call-parser`) overrides it, for models whose template does not say what they emit."""
        if tool_call_parser != "auto" and tool_call_parser not in TOOL_PARSERS:
            raise ValueError(f"unknown tool call parser {tool_call_parser!r}; known: auto, {', '.join(TOOL_PARSERS)}")
        self.compiler = get_compiler(tokenizer)
        model_template = tokenizer.hf.chat_template  # already the --chat-template override, when one is given
        self.tool_template = tool_template_for(model_template)
        if tool_call_parser == "auto":
            tool_call_parser = detect_tool_parser(model_template if self.tool_template is None else self.tool_template)
        self.tool_parser = tool_call_parser

    async def constraint(self, req: SamplingFields) -> GrammarSpec | None:
        so = structured_outputs_of(req)
        if so is None:
            return None
        param = "structured_outputs" if req.structured_outputs is not None else "response_format"
        try:
            return await asyncio.to_thread(self.compiler.compile, so)
        except StructuredOutputError as e:
            raise _api_error(e, param) from None

    async def chat_plan(self, req: ChatCompletionRequest) -> ChatPlan:
        constraint = await self.constraint(req)
        raw_tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        choice: Any = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice
        try:
            tools = parse_tools(raw_tools)
            plan = await asyncio.to_thread(plan_tools, tools, choice, req.parallel_tool_calls, self.compiler,
                                           self.tool_parser)
        except StructuredOutputError as e:
            raise bad_request(e.problem, (e.param or "tools").replace("[", ".").replace("]", "")) from None
        if plan.forced and constraint is not None:
            raise bad_request("response_format / structured_outputs cannot be combined with tool_choice "
                              "'required' or a named function (the call's arguments are the structured output)",
                              "tool_choice")
        offered = raw_tools if plan.parser is not None else None  # tool_choice none: tools stay out of the prompt
        history = any(m.role == "tool" or m.tool_calls for m in req.messages)
        template = self.tool_template if (offered or history) else None
        return ChatPlan(plan.grammar or constraint, offered, template, plan.parser)


def tool_calls_of(ex: ExtractedToolCalls) -> list[ToolCall]:
    return [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in ex.tool_calls]


def finish_reason(reason: str | None, has_calls: bool) -> str | None:
    # A call the model finished is "tool_calls" (the client is to run it); one cut by max_tokens stays "length".
    return "tool_calls" if has_calls and reason == "stop" else reason


class ToolCallStream:
    """One choice's streamed output through a tool parser: text deltas in, content and tool-call deltas out."""

    def __init__(self, parser: ToolParser) -> None:
        self.streamer: ToolStreamer = parser.streamer()
        self.has_calls = False

    def feed(self, text: str, finished: bool) -> tuple[str, list[DeltaToolCall]]:
        parts = [self.streamer.feed(text)] if text else []
        if finished:
            parts.append(self.streamer.finish())
        content = "".join(p.content for p in parts)
        deltas = [self._delta(d) for p in parts for d in _merged(p)]
        self.has_calls = self.has_calls or bool(deltas)
        return content, deltas

    @staticmethod
    def _delta(d: Any) -> DeltaToolCall:
        if d.id is not None:
            return DeltaToolCall(index=d.index, id=d.id, type="function",
                                 function=DeltaFunctionCall(name=d.name, arguments=d.arguments))
        return DeltaToolCall(index=d.index, function=DeltaFunctionCall(arguments=d.arguments))


def _merged(p: StreamDelta) -> list[Any]:
    return [d for d in p.tool_calls if d.id is not None or d.arguments]
