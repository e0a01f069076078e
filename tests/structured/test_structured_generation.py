"""Constrained generation with the embedded model through the offline API (CPU).

Few `generate` calls, each a whole batch: the 54 schemas run together, and one mixed batch covers json_object,
regex, choice, free text, n > 1 with seeds, truncation and forced tool calls side by side (a request's grammar
must not leak into its neighbours).
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
from structured_schemas import CASES

from ember import SamplingParams
from ember.structured import StructuredOutputs, compile_structured, get_compiler
from ember.structured.chat_template import chatml_tools_template
from ember.structured.tools import parse_tools, plan_tools

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Get the local time",
                                           "parameters": {"type": "object", "properties": {
                                               "timezone": {"type": "string", "maxLength": 20}},
                                               "required": ["timezone"], "additionalProperties": False}}}]


def chat_ids(llm: Any, text: str, tools: list[dict[str, Any]] | None = None) -> list[int]:
    tok = llm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], tools=tools,
                                     chat_template=chatml_tools_template() if tools else None)
    return tok.encode(prompt, add_special_tokens=False)


def test_fifty_schemas_all_validate(smol_llm: Any) -> None:
    assert len(CASES) >= 50
    tok = smol_llm.tokenizer
    # Bare prompts: the chat template's system prompt would make prefill cost more than the whole decode here.
    prompts = [tok.encode(f"JSON for {what}:", add_special_tokens=False) for what, _ in CASES]
    params = [SamplingParams(temperature=0, max_tokens=120,
                             structured_output=compile_structured(StructuredOutputs(json=schema), tok))
              for _, schema in CASES]
    outs = smol_llm.generate(prompt_token_ids=prompts, sampling_params=params)
    for (what, schema), out in zip(CASES, outs, strict=True):
        c = out.outputs[0]
        assert c.finish_reason == "stop", f"{what}: did not complete: {c.text!r}"
        jsonschema.validate(json.loads(c.text), schema)


@pytest.fixture(scope="module")
def mixed(smol_llm: Any) -> dict[str, Any]:
    """One batch: constrained and free requests of every kind, run together."""
    tok = smol_llm.tokenizer
    comp = get_compiler(tok)

    def so(**kw: Any) -> Any:
        return compile_structured(StructuredOutputs(**kw), tok)

    tools = parse_tools(TOOLS)
    named = plan_tools(tools, {"type": "function", "function": {"name": "get_weather"}}, True, comp, "hermes")
    required = plan_tools(tools, "required", True, comp, "hermes")
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    reqs: dict[str, tuple[str, SamplingParams]] = {
        "free_a": ("Say hello to Anna.", SamplingParams(temperature=0, max_tokens=24)),
        "obj_a": ("Give me a JSON object with keys 'name' and 'age' for a cat.",
                  SamplingParams(temperature=0, max_tokens=100, structured_output=so(json_object=True))),
        "regex": ("What is your phone number?",
                  SamplingParams(temperature=0, max_tokens=30, structured_output=so(regex=r"\(\d{3}\) \d{3}-\d{4}"))),
        "choice": ("Is the sky blue? Answer yes or no.",
                   SamplingParams(temperature=0, max_tokens=10, structured_output=so(choice=["yes", "no",
                                                                                              "not sure"]))),
        "free_b": ("Write a haiku about autumn.", SamplingParams(temperature=0, max_tokens=24)),
        "obj_b": ("Give me a JSON object with keys 'x' and 'y' set to small integers.",
                  SamplingParams(temperature=0, max_tokens=100, structured_output=so(json_object=True))),
        "seeded_1": ("Invent a person as JSON.", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=60,
                                                                 structured_output=so(json=person))),
        "seeded_2": ("Invent a person as JSON.", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=60,
                                                                 structured_output=so(json=person))),
        "truncated": ("Invent a person as JSON.", SamplingParams(temperature=0, max_tokens=4,
                                                                  structured_output=so(json=person))),
        "grammar": ("Count to three.", SamplingParams(temperature=0, max_tokens=20, structured_output=so(
            grammar='start: NUM (", " NUM)~2\nNUM: /[1-9]/'))),
        "named_tool": ("What's the weather like in Paris?",
                       SamplingParams(temperature=0, max_tokens=40, structured_output=named.grammar)),
        "required_tool": ("What's the weather like in Paris, and what time is it in Tokyo?",
                          SamplingParams(temperature=0, max_tokens=90, structured_output=required.grammar)),
    }
    names = list(reqs)
    prompts = [chat_ids(smol_llm, reqs[k][0], TOOLS if k.endswith("_tool") else None) for k in names]
    outs = smol_llm.generate(prompt_token_ids=prompts, sampling_params=[reqs[k][1] for k in names])
    # The free requests alone, unbatched: their output must not depend on neighbours' grammars.
    alone = smol_llm.generate(prompt_token_ids=[prompts[names.index("free_a")], prompts[names.index("free_b")]],
                              sampling_params=[reqs["free_a"][1], reqs["free_b"][1]])
    return {"out": dict(zip(names, outs, strict=True)), "alone": alone, "plans": (named, required),
            "prompts": dict(zip(names, prompts, strict=True)), "params": {k: v[1] for k, v in reqs.items()}}


def test_json_object_parses(mixed: dict[str, Any]) -> None:
    for key in ("obj_a", "obj_b"):
        c = mixed["out"][key].outputs[0]
        assert c.finish_reason == "stop", c.text
        assert isinstance(json.loads(c.text), dict)


def test_regex_choice_grammar(mixed: dict[str, Any]) -> None:
    out = mixed["out"]
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", out["regex"].outputs[0].text)
    assert out["regex"].outputs[0].finish_reason == "stop"
    assert out["choice"].outputs[0].text in ("yes", "no", "not sure")
    assert re.fullmatch(r"[1-9](, [1-9]){2}", out["grammar"].outputs[0].text)


def test_free_requests_unaffected_by_constrained_neighbours(mixed: dict[str, Any]) -> None:
    out, alone = mixed["out"], mixed["alone"]
    for key, solo in zip(("free_a", "free_b"), alone, strict=True):
        assert out[key].outputs[0].text == solo.outputs[0].text
        assert out[key].outputs[0].token_ids == solo.outputs[0].token_ids


def test_n_and_seeds(mixed: dict[str, Any]) -> None:
    schema = mixed["params"]["seeded_1"].structured_output
    a, b = mixed["out"]["seeded_1"].outputs, mixed["out"]["seeded_2"].outputs
    assert len(a) == 3 and schema is mixed["params"]["seeded_2"].structured_output  # one compiled grammar
    for c in a + b:
        assert c.finish_reason == "stop", c.text
        person = json.loads(c.text)
        assert set(person) == {"name", "age"} and 0 <= person["age"] <= 120
    assert [c.text for c in a] == [c.text for c in b]  # same seed, same samples
    assert len({c.text for c in a}) > 1  # the n samples differ from each other


def test_max_tokens_truncation_gives_length(mixed: dict[str, Any]) -> None:
    c = mixed["out"]["truncated"].outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 4
    assert c.text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(c.text)


def test_forced_tool_calls(mixed: dict[str, Any]) -> None:
    named, required = mixed["plans"]
    c = mixed["out"]["named_tool"].outputs[0]
    assert c.finish_reason == "stop"
    ex = named.parser.extract(c.text)
    assert [t.name for t in ex.tool_calls] == ["get_weather"] and ex.content is None
    jsonschema.validate(json.loads(ex.tool_calls[0].arguments), WEATHER)

    c = mixed["out"]["required_tool"].outputs[0]
    assert c.finish_reason == "stop", c.text
    ex = required.parser.extract(c.text)
    assert ex.tool_calls, c.text
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in ex.tool_calls:
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def test_prefix_cache_same_prompt_same_output(smol_llm: Any, mixed: dict[str, Any]) -> None:
    # The person prompt ran in the mixed batch: its blocks are cached; a greedy constrained rerun must reuse
    # them and produce the same tokens (the grammar state starts fresh for the new request).
    params = mixed["params"]["truncated"].clone(max_tokens=60)
    first = smol_llm.generate(prompt_token_ids=[mixed["prompts"]["truncated"]], sampling_params=params)[0]
    again = smol_llm.generate(prompt_token_ids=[mixed["prompts"]["truncated"]], sampling_params=params)[0]
    assert again.num_cached_tokens > 0
    assert first.outputs[0].text == again.outputs[0].text
    assert first.outputs[0].finish_reason == "stop"
    assert json.loads(again.outputs[0].text)["name"]
