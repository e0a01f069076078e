"""Tool-call parsers: non-streamed extraction, and streamed deltas reassembling to it under every chunking."""

from __future__ import annotations

import json
import random

import pytest

from ember.structured.json_scan import scan_object, value_end
from ember.structured.tool_parsers import (
    ExtractedToolCalls,
    HermesToolParser,
    JsonArrayToolParser,
    Llama3JsonToolParser,
    NamedToolParser,
    ToolParser,
    get_tool_parser,
)


def stream(parser: ToolParser, chunks: list[str]) -> tuple[str, list[tuple[str, str]], list[int]]:
    """Feed chunks; return (content, [(name, arguments)], indices in order of first appearance)."""
    s = parser.streamer()
    parts = [s.feed(c) for c in chunks] + [s.finish()]
    content = "".join(p.content for p in parts)
    calls: dict[int, list[str]] = {}
    order: list[int] = []
    for p in parts:
        for d in p.tool_calls:
            if d.id is not None:
                assert d.index not in calls, "a call announced twice"
                assert d.id.startswith("call_") and d.name
                calls[d.index] = [d.name, ""]
                order.append(d.index)
            else:
                assert d.index in calls, "arguments before the call's name"
                assert d.name is None
            calls[d.index][1] += d.arguments
    return content, [(calls[i][0], calls[i][1]) for i in sorted(calls)], order


def chunkings(text: str, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    out = [[text], list(text)]
    for _ in range(4):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return out


def check_stream_matches(parser: ToolParser, text: str) -> ExtractedToolCalls:
    ex = parser.extract(text)
    want = [(c.name, c.arguments) for c in ex.tool_calls]
    for chunks in chunkings(text):
        content, calls, order = stream(parser, chunks)
        if want:  # streaming cannot take back what it sent; the comparison holds for valid calls
            assert calls == want, chunks
            assert order == sorted(order)
            assert (content or None) == ex.content, chunks
        else:
            assert content == text and not calls
    return ex


HERMES_CASES = [
    ('I will look that up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
     "</tool_call>", "I will look that up.", [("get_weather", {"city": "Paris", "unit": "c"})]),
    ('<tool_call>\n{"name": "a", "arguments": {"x": [1, {"y": "}{\\"]"}]}}\n</tool_call>\n<tool_call>\n'
     '{"name": "b", "arguments": {}}\n</tool_call>', None, [("a", {"x": [1, {"y": '}{"]'}]}), ("b", {})]),
    ('<tool_call>{"arguments": {"q": "late name"}, "name": "search"}</tool_call>', None,
     [("search", {"q": "late name"})]),
    ('<tool_call>{"name": "stringified", "arguments": "{\\"n\\": 2}"}</tool_call>', None,
     [("stringified", {"n": 2})]),
    ('<tool_call>{"name": "noargs"}</tool_call>', None, [("noargs", {})]),
    ('<tool_call>{"name": "unclosed", "arguments": {"k": "v"}}', None, [("unclosed", {"k": "v"})]),
    ("Plain answer with <b>tags</b> and a trailing newline.\n", "Plain answer with <b>tags</b> and a trailing "
     "newline.\n", []),
    ("Use the <tool_call> tag? No: this is prose.", "Use the <tool_call> tag? No: this is prose.", []),
    ("ends with a partial tag <tool_ca", "ends with a partial tag <tool_ca", []),
    ("", None, []),
]


@pytest.mark.parametrize("text,content,calls", HERMES_CASES)
def test_hermes(text: str, content: str | None, calls: list[tuple[str, dict]]) -> None:
    ex = check_stream_matches(HermesToolParser(), text)
    assert ex.content == content
    assert [(c.name, json.loads(c.arguments)) for c in ex.tool_calls] == calls
    assert len({c.id for c in ex.tool_calls}) == len(calls)


def test_hermes_invalid_arguments_fall_back_to_content() -> None:
    text = '<tool_call>{"name": "f", "arguments": {"a": tru}}</tool_call>'
    ex = HermesToolParser().extract(text)
    assert ex.tool_calls == [] and ex.content == text


def test_hermes_parallel_limit() -> None:
    text = ('<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}'
            "</tool_call>")
    assert [c.name for c in HermesToolParser(max_calls=1).extract(text).tool_calls] == ["a"]
    _, calls, _ = stream(HermesToolParser(max_calls=1), list(text))
    assert calls == [("a", "{}")]


LLAMA_CASES = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {"b": [2, 3]}}',
     [("f", {"a": 1}), ("g", {"b": [2, 3]})]),
    ('  {"name": "h", "arguments": {"s": "x;y"}}', [("h", {"s": "x;y"})]),
]


@pytest.mark.parametrize("text,calls", LLAMA_CASES)
def test_llama3_json(text: str, calls: list[tuple[str, dict]]) -> None:
    ex = check_stream_matches(Llama3JsonToolParser(), text)
    assert ex.content is None
    assert [(c.name, json.loads(c.arguments)) for c in ex.tool_calls] == calls


@pytest.mark.parametrize("text", ["The weather is nice.", "{not json at all", "<|python_tag|> print(1)"])
def test_llama3_json_plain_text(text: str) -> None:
    ex = check_stream_matches(Llama3JsonToolParser(), text)
    assert ex.tool_calls == [] and ex.content == text


def test_json_array_required_format() -> None:
    text = '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {"y": {"z": []}}}]'
    ex = check_stream_matches(JsonArrayToolParser(), text)
    assert [(c.name, json.loads(c.arguments)) for c in ex.tool_calls] == [("a", {"x": 1}), ("b", {"y": {"z": []}})]
    assert [c.name for c in JsonArrayToolParser(max_calls=1).extract(text).tool_calls] == ["a"]


def test_named_streams_name_first_then_arguments() -> None:
    text = '{"city": "Oslo", "days": 3}'
    ex = check_stream_matches(NamedToolParser("forecast"), text)
    assert [(c.name, c.arguments) for c in ex.tool_calls] == [("forecast", text)]
    s = NamedToolParser("forecast").streamer()
    first = s.feed("")
    assert first.tool_calls[0].name == "forecast" and first.tool_calls[0].arguments == ""


def test_name_is_sent_before_any_argument_text() -> None:
    text = '<tool_call>{"name": "f", "arguments": {"a": "long value here"}}</tool_call>'
    s = HermesToolParser().streamer()
    seen_args = ""
    for ch in text:
        for d in s.feed(ch).tool_calls:
            if d.id is None:
                seen_args += d.arguments
    # Arguments arrive in more than one piece: they stream, not only at the end.
    assert seen_args == '{"a": "long value here"}'


def test_unknown_parser() -> None:
    with pytest.raises(ValueError, match="unknown tool call parser"):
        get_tool_parser("nope")


@pytest.mark.parametrize("text,end", [('"a\\"b" rest', 6), ("[1, [2], {\"x\": \"]\"}] z", 20), ("123, 4", 3),
                                      ('{"a": 1', None), ("12", None), ('"open', None)])
def test_value_end(text: str, end: int | None) -> None:
    assert value_end(text, 0) == end


def test_scan_object_partial_and_error() -> None:
    s = '{"name": "f", "arguments": {"a": [1, 2'
    scan = scan_object(s, 0)
    assert scan.string_field(s, "name") == "f" and scan.fields["arguments"][1] is None and scan.end is None
    assert scan_object('{"a" 1}', 0).error
    assert scan_object('{"a": 1} x', 0).end == 8
