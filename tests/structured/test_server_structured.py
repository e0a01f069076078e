"""Structured outputs and tool calling over HTTP, through the openai SDK against the live server (tests/conftest.py).

Greedy decoding throughout, so a streamed request produces the same text as its non-streamed twin and the
reassembled deltas can be compared with the non-streamed message.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import openai
import pytest

MODEL = "llm"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a timezone",
                                      "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What's the weather in Paris, and the time in Tokyo?"}]


def chat(client: openai.OpenAI, **kw: Any) -> Any:
    return client.chat.completions.create(model=MODEL, temperature=0, **kw)


def stream_chat(client: openai.OpenAI, **kw: Any) -> tuple[str | None, list[dict[str, str]], str | None]:
    """Reassemble a streamed chat: (content, [{id, name, arguments}] by index, finish_reason)."""
    content: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in chat(client, stream=True, **kw):
        for choice in chunk.choices:
            d = choice.delta
            if d.content:
                content.append(d.content)
            for tc in d.tool_calls or []:
                if tc.id is not None:  # the first delta of a call: id, type, name
                    assert tc.index not in calls and tc.type == "function" and tc.function.name
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                assert tc.index in calls, "arguments streamed before the call's name"
                calls[tc.index]["arguments"] += tc.function.arguments or ""
            if choice.finish_reason is not None:
                finish = choice.finish_reason
    return "".join(content) or None, [calls[i] for i in sorted(calls)], finish


def calls_of(message: Any) -> list[dict[str, str]]:
    return [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in message.tool_calls or []]


def without_ids(calls: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(c["name"], c["arguments"]) for c in calls]


# ------------------------------------------------------------------------------------------- response_format


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    r = chat(client, messages=[{"role": "user", "content": "Invent a person."}], max_tokens=60,
             response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                       "strict": True}})
    c = r.choices[0]
    assert c.finish_reason == "stop"
    jsonschema.validate(json.loads(c.message.content), PERSON)
    assert not c.message.tool_calls


def test_json_object_response_format_streamed(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Give me a JSON object with keys 'name' and 'age' for a cat."}]
    r = chat(client, messages=messages, max_tokens=80, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    content, calls, finish = stream_chat(client, messages=messages, max_tokens=80,
                                         response_format={"type": "json_object"})
    assert content == r.choices[0].message.content and not calls and finish == "stop"


@pytest.mark.parametrize("so,check", [
    ({"regex": r"[A-Z][a-z]{2,8} [0-9]{1,2}"}, lambda t: re.fullmatch(r"[A-Z][a-z]{2,8} [0-9]{1,2}", t)),
    ({"choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
    ({"grammar": 'root ::= "A" [0-9] [0-9]'}, lambda t: re.fullmatch(r"A[0-9][0-9]", t)),
    ({"json": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
])
def test_structured_outputs_extra(client: openai.OpenAI, so: dict[str, Any], check: Any) -> None:
    r = chat(client, messages=[{"role": "user", "content": "Answer."}], max_tokens=40,
             extra_body={"structured_outputs": so})
    assert r.choices[0].finish_reason == "stop" and check(r.choices[0].message.content), r.choices[0].message


def test_completions_with_structured_outputs_n2(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="My favourite colour is", max_tokens=8, n=2, seed=3,
                                  temperature=1.0, extra_body={"structured_outputs": {"choice": [" red", " blue"]}})
    assert len(r.choices) == 2 and all(c.text in (" red", " blue") and c.finish_reason == "stop"
                                       for c in r.choices)


@pytest.mark.parametrize("extra,param,words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}},
     "response_format.json_schema.schema", "uniqueItems"),
    ({"structured_outputs": {"regex": "a(("}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"jsn": {}}}, "structured_outputs.jsn", ""),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "not both"),
    ({"response_format": {"type": "json_schema"}}, "response_format", ""),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not among the tools"),
    ({"tool_choice": "required"}, "tool_choice", "requires tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", ""),
])
def test_invalid_constraints_are_400(client: openai.OpenAI, extra: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        chat(client, messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body=extra)
    err = ei.value.body
    assert isinstance(err, dict) and err.get("param") == param, err
    assert words in err["message"]


# ------------------------------------------------------------------------------------------- tool calling


def test_named_tool_choice_matches_stream(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"messages": ASK, "tools": TOOLS, "max_tokens": 60,
                          "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    r = chat(client, **kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    calls = calls_of(c.message)
    assert [x["name"] for x in calls] == ["get_weather"] and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)
    content, streamed, finish = stream_chat(client, **kw)
    assert content is None and finish == "tool_calls"
    assert without_ids(streamed) == without_ids(calls)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_choice_matches_stream(client: openai.OpenAI, parallel: bool) -> None:
    kw: dict[str, Any] = {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 100,
                          "parallel_tool_calls": parallel}
    r = chat(client, **kw)
    c = r.choices[0]
    calls = calls_of(c.message)
    assert c.finish_reason == "tool_calls" and calls
    assert len(calls) == 1 or parallel
    assert len({x["id"] for x in calls}) == len(calls)
    for x in calls:
        jsonschema.validate(json.loads(x["arguments"]), SCHEMAS[x["name"]])
    content, streamed, finish = stream_chat(client, **kw)
    assert finish == "tool_calls" and without_ids(streamed) == without_ids(calls)


# The model's own format under tool_choice auto, made deterministic: a grammar makes the model write a Hermes
# call with some text before it, and the hermes parser must find it, streamed and not.
HERMES_OUTPUT = (r"Let me check\.\n<tool_call>\n\{\"name\": \"get_weather\", \"arguments\": \{\"city\": "
                 r"\"[A-Z][a-z]{2,9}\", \"unit\": \"(celsius|fahrenheit)\"\}\}\n</tool_call>")


def test_auto_tool_choice_parses_hermes_calls(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"messages": ASK, "tools": TOOLS, "max_tokens": 60,
                          "extra_body": {"structured_outputs": {"regex": HERMES_OUTPUT}}}
    r = chat(client, **kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert c.message.content == "Let me check."
    calls = calls_of(c.message)
    assert [x["name"] for x in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)
    content, streamed, finish = stream_chat(client, **kw)
    assert (content, without_ids(streamed), finish) == ("Let me check.", without_ids(calls), "tool_calls")


# Llama 3.1's JSON call format, forced the same way. The embedded model's template gets ember's Hermes-style
# tool template, so only `--tool-call-parser llama3_json` can read this as a call.
LLAMA3_OUTPUT = (r"\{\"name\": \"get_weather\", \"parameters\": \{\"city\": \"[A-Z][a-z]{2,9}\", "
                 r"\"unit\": \"(celsius|fahrenheit)\"\}\}")


def test_tool_call_parser_flag_overrides_the_template(live_server: Any, client: openai.OpenAI) -> None:
    from ember.cli import build_parser, server_config_from_args
    from ember.server.app import get_state

    kw: dict[str, Any] = {"messages": ASK, "tools": TOOLS, "max_tokens": 60,
                          "extra_body": {"structured_outputs": {"regex": LLAMA3_OUTPUT}}}
    # The default server detects hermes from the template, so the same output stays plain content.
    plain = chat(client, **kw).choices[0]
    assert re.fullmatch(LLAMA3_OUTPUT, plain.message.content or "") and not plain.message.tool_calls
    assert plain.finish_reason == "stop"

    args = build_parser().parse_args(["serve", "--served-model-name", MODEL, "--tool-call-parser", "llama3_json"])
    with live_server.extra_app(server_config_from_args(args)) as (url, app):
        state = get_state(app)
        assert state.chat is not None and state.chat.structured.tool_parser == "llama3_json"
        llama = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=120)
        c = chat(llama, **kw).choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        calls = calls_of(c.message)
        assert [x["name"] for x in calls] == ["get_weather"]
        assert json.loads(calls[0]["arguments"]) == json.loads(plain.message.content)["parameters"]
        content, streamed, finish = stream_chat(llama, **kw)
        assert (content, without_ids(streamed), finish) == (None, without_ids(calls), "tool_calls")


def test_tool_choice_none_and_plain_answers(client: openai.OpenAI) -> None:
    # Without a call in the output, auto returns plain content and finish_reason stop/length.
    r = chat(client, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=12)
    assert not r.choices[0].message.tool_calls and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    r = chat(client, messages=ASK, tools=TOOLS, max_tokens=12,
             extra_body={"structured_outputs": {"choice": ["I cannot check that."]}})
    assert r.choices[0].message.content == "I cannot check that." and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"


def test_tool_results_go_back_into_the_conversation(client: openai.OpenAI) -> None:
    first = chat(client, messages=ASK, tools=TOOLS, max_tokens=60,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    msg = first.choices[0].message
    call = msg.tool_calls[0]
    history: list[Any] = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    r = chat(client, messages=history, tools=TOOLS, max_tokens=16,
             extra_body={"structured_outputs": {"regex": "It is [0-9]{1,2} degrees\\."}})
    assert re.fullmatch(r"It is [0-9]{1,2} degrees\.", r.choices[0].message.content)
    # The conversation was rendered with the tool template: the result is in the prompt.
    assert r.usage.prompt_tokens > first.usage.prompt_tokens + 20


@pytest.mark.parametrize("message", [
    {"role": "tool", "content": "x"},  # no tool_call_id
    {"role": "user", "content": "x", "tool_call_id": "call_1"},
    {"role": "user", "content": None},
    {"role": "user", "content": "x", "tool_calls": [{"id": "c", "type": "function",
                                                     "function": {"name": "f", "arguments": "{}"}}]},
])
def test_malformed_tool_messages_400(client: openai.OpenAI, message: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError):
        chat(client, messages=[*ASK, message], max_tokens=4)
