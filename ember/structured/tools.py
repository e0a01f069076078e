"""Tool definitions, tool_choice, and the grammars that force a call.

tool_choice "required" and a named function are grammar-forced, as vLLM does, in formats independent of the
model's own: a named function's output is exactly its arguments (a JSON value of its `parameters` schema);
"required" outputs a JSON array `[{"name": ..., "parameters": {...}}, ...]` (one element when
parallel_tool_calls is false). Each function's schema is embedded as its own root (Lark `%json`), so `$ref`s
inside `parameters` resolve as the client wrote them. "auto" leaves the output free and parses the model's format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ember.sampling.grammar import GrammarSpec
from ember.structured.compiler import COMPACT_JSON, GrammarCompiler
from ember.structured.params import StructuredOutputError, StructuredOutputs
from ember.structured.tool_parsers import (
    JsonArrayToolParser,
    NamedToolParser,
    ToolParser,
    get_tool_parser,
)

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class FunctionTool:
    name: str
    parameters: dict[str, Any]
    description: str | None = None


def parse_tools(tools: list[dict[str, Any]] | None) -> list[FunctionTool]:
    """OpenAI `tools` (`[{"type": "function", "function": {name, description?, parameters?, strict?}}]`)."""
    out: list[FunctionTool] = []
    seen: set[str] = set()
    for i, t in enumerate(tools or []):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise StructuredOutputError("tool", f'{where} must be {{"type": "function", "function": {{...}}}}',
                                        where)
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise StructuredOutputError("tool", f"{where}.function.name must be a non-empty string", where)
        if name in seen:
            raise StructuredOutputError("tool", f"two tools are named {name!r}", where)
        seen.add(name)
        params = fn.get("parameters")
        if params is None:
            params = EMPTY_PARAMETERS
        if not isinstance(params, dict):
            raise StructuredOutputError("tool", f"{where}.function.parameters must be a JSON schema object", where)
        desc = fn.get("description")
        out.append(FunctionTool(name, params, desc if isinstance(desc, str) else None))
    return out


def validate_tools(tools: list[FunctionTool], compiler: GrammarCompiler) -> None:
    """Compile every function's parameters schema (cached): a schema the engine cannot enforce is a client error
    even under tool_choice "auto", since "required" or a named choice would fail on it later."""
    for i, t in enumerate(tools):
        try:
            compiler.compile(StructuredOutputs(json=t.parameters))
        except StructuredOutputError as e:
            raise StructuredOutputError("tool", f"function {t.name!r}: {e.problem}", f"tools[{i}]") from None


def named_choice(tool_choice: Any) -> str | None:
    """The function name of `{"type": "function", "function": {"name": ...}}`, None for the string choices."""
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise StructuredOutputError("tool", f"tool_choice must be none, auto, required or a named function, "
                                                f"got {tool_choice!r}", "tool_choice")
        return None
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(name, str):
        raise StructuredOutputError("tool", 'a named tool_choice is {"type": "function", "function": {"name": ...}}',
                                    "tool_choice")
    return name


@dataclass
class ToolPlan:
    """How a request with tools runs: the grammar to force (None: free output) and how to read the output."""

    grammar: GrammarSpec | None
    parser: ToolParser | None  # None: tool_choice "none", output is plain content
    forced: bool


def plan_tools(tools: list[FunctionTool], tool_choice: Any, parallel_tool_calls: bool, compiler: GrammarCompiler,
               auto_parser: str) -> ToolPlan:
    """tool_choice defaults (None) to "auto" when there are tools, as OpenAI's does."""
    choice = "auto" if tool_choice is None else tool_choice
    name = named_choice(choice)
    if not tools:
        if choice in ("none", "auto"):
            return ToolPlan(None, None, False)
        raise StructuredOutputError("tool", "tool_choice requires tools", "tool_choice")
    validate_tools(tools, compiler)
    max_calls = None if parallel_tool_calls else 1
    if name is not None:
        tool = next((t for t in tools if t.name == name), None)
        if tool is None:
            raise StructuredOutputError("tool", f"tool_choice names {name!r}, which is not among the tools",
                                        "tool_choice")
        return ToolPlan(compiler.compile(StructuredOutputs(json=tool.parameters)), NamedToolParser(name), True)
    if choice == "required":
        return ToolPlan(compiler.compile_lark(required_grammar(tools, parallel_tool_calls)),
                        JsonArrayToolParser(max_calls), True)
    if choice == "none":
        return ToolPlan(None, None, False)
    return ToolPlan(None, get_tool_parser(auto_parser, max_calls), False)


def required_grammar(tools: list[FunctionTool], parallel: bool) -> str:
    """Lark: a JSON array of calls, each `{"name": <a tool's name>, "parameters": <that tool's schema>}`."""
    lines = ['start: "[" call ("," " " call)* "]"' if parallel else 'start: "[" call "]"',
             "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
    for i, t in enumerate(tools):
        head = '{"name": ' + json.dumps(t.name) + ', "parameters": '
        lines.append(f'call_{i}: {json.dumps(head)} args_{i} "}}"')
        lines.append(f"args_{i}: %json {json.dumps({**t.parameters, 'x-guidance': COMPACT_JSON})}")
    return "\n".join(lines) + "\n"
