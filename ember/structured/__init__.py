"""Structured outputs (JSON schema, JSON object, regex, choice, grammar) and tool calling.

    spec = compile_structured(StructuredOutputs(json=schema), llm.tokenizer)
    llm.generate(prompt, SamplingParams(structured_output=spec))
"""

from ember.structured.compiler import GrammarCompiler, clear_cache, compile_structured, get_compiler
from ember.structured.params import StructuredOutputError, StructuredOutputs
from ember.structured.tool_parsers import (
    ExtractedToolCalls,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    get_tool_parser,
)
from ember.structured.tools import FunctionTool, ToolPlan, parse_tools, plan_tools

__all__ = ["ExtractedToolCalls", "FunctionTool", "GrammarCompiler", "StreamDelta", "StructuredOutputError",
           "StructuredOutputs", "ToolCall", "ToolCallDelta", "ToolParser", "ToolPlan", "clear_cache",
           "compile_structured", "get_compiler", "get_tool_parser", "parse_tools", "plan_tools"]
