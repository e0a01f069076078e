"""Compiling constraints: errors name the problem, the cache works, matchers accept and reject token streams."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from ember.sampling.grammar import bitmask_words
from ember.structured import StructuredOutputError, StructuredOutputs, compile_structured, get_compiler
from ember.structured.chat_template import chatml_tools_template, detect_tool_parser, tool_template_for
from ember.structured.compiler import ascii_classes
from ember.structured.tools import parse_tools, plan_tools, required_grammar


@pytest.fixture(scope="module")
def tok(smol_llm: Any) -> Any:
    return smol_llm.tokenizer


def accepts(spec: Any, tok: Any, text: str) -> bool:
    """Whether the grammar accepts `text` (tokenized canonically) and is then complete."""
    m = spec.new_matcher()
    return all(m.accept_token(t) for t in tok.encode(text, add_special_tokens=False)) and (
        m.is_terminated() or m.matcher.is_accepting())


@pytest.mark.parametrize("schema,problem", [
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "strin"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
    ({"type": "string", "format": "no-such-format"}, "no-such-format"),
    ({"type": "string", "pattern": "(("}, "regex"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "nsatisfiable"),
    ([1, 2], "object"),
    (False, "nothing"),
])
def test_unsupported_or_invalid_schema_raises(tok: Any, schema: Any, problem: str) -> None:
    with pytest.raises(StructuredOutputError) as ei:
        compile_structured(StructuredOutputs(json=schema), tok)
    assert ei.value.kind == "json"
    assert problem in ei.value.problem


def test_schema_text_that_is_not_json(tok: Any) -> None:
    with pytest.raises(StructuredOutputError, match="not valid JSON"):
        compile_structured(StructuredOutputs(json='{"type": "object",'), tok)


@pytest.mark.parametrize("kwargs,problem", [
    ({}, "exactly one"),
    ({"regex": "a", "choice": ["a"]}, "exactly one"),
    ({"choice": []}, "non-empty list"),
    ({"choice": ["a", 3]}, "non-empty list"),
    ({"regex": ""}, "non-empty string"),
    ({"json": 3}, "must be an object"),
])
def test_bad_structured_outputs(kwargs: dict[str, Any], problem: str) -> None:
    with pytest.raises(StructuredOutputError, match=problem):
        StructuredOutputs(**kwargs)


@pytest.mark.parametrize("kind,spec,problem", [
    ("regex", "a(b", "regex"),
    ("grammar", "start: (", ""),
    ("grammar", "root ::= \"a\" (", ""),
])
def test_bad_regex_and_grammar_raise(tok: Any, kind: str, spec: str, problem: str) -> None:
    with pytest.raises(StructuredOutputError) as ei:
        compile_structured(StructuredOutputs(**{kind: spec}), tok)
    assert ei.value.kind == kind and problem in ei.value.problem and ei.value.problem


def test_cache_hits_and_key_order_kept(tok: Any) -> None:
    comp = get_compiler(tok)
    a = {"type": "object", "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "integer"}},
         "required": ["zeta", "alpha"]}
    s1 = compile_structured(StructuredOutputs(json=a), tok)
    hits = comp.hits
    assert compile_structured(StructuredOutputs(json=json.dumps(a, indent=2)), tok) is s1  # other spacing
    assert comp.hits == hits + 1
    # Properties come out in the schema's order, not sorted.
    assert accepts(s1, tok, '{"zeta": 1, "alpha": 2}')
    assert not accepts(s1, tok, '{"alpha": 2, "zeta": 1}')
    # A whitespace option is part of the key.
    loose = compile_structured(StructuredOutputs(json=a, disable_any_whitespace=False), tok)
    assert loose is not s1 and accepts(loose, tok, '{\n  "zeta": 1,\n  "alpha": 2\n}')
    assert not accepts(s1, tok, '{\n  "zeta": 1,\n  "alpha": 2\n}')


def test_matchers_per_kind(tok: Any) -> None:
    person = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer",
                                                                                   "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    spec = compile_structured(StructuredOutputs(json=person), tok)
    assert accepts(spec, tok, '{"name": "Ada", "age": 36}')
    assert not accepts(spec, tok, '{"name": "Ada", "age": 151}')
    assert not accepts(spec, tok, '{"name": "Ada"}')
    obj = compile_structured(StructuredOutputs(json_object=True), tok)
    assert accepts(obj, tok, '{"a": [1, {"b": null}]}') and not accepts(obj, tok, "[1]")
    rx = compile_structured(StructuredOutputs(regex=r"\d{3}-\d{4}"), tok)
    assert accepts(rx, tok, "555-1234") and not accepts(rx, tok, "55-1234")
    assert not accepts(rx, tok, "\U0001fbf8\U0001fbf8\U0001fbf8-1234")  # \d is ASCII, as in JSON Schema
    ch = compile_structured(StructuredOutputs(choice=["yes", "no", 'say "hi"']), tok)
    assert accepts(ch, tok, "yes") and accepts(ch, tok, 'say "hi"') and not accepts(ch, tok, "maybe")
    lark = compile_structured(StructuredOutputs(grammar='start: "x" NUM\nNUM: /[0-9]+/'), tok)
    assert accepts(lark, tok, "x42") and not accepts(lark, tok, "y42")
    gbnf = compile_structured(StructuredOutputs(grammar='root ::= "a" [0-9] "b"'), tok)
    assert accepts(gbnf, tok, "a5b") and not accepts(gbnf, tok, "ab")


def test_matcher_mask_and_termination(tok: Any) -> None:
    spec = compile_structured(StructuredOutputs(choice=["yes", "no"]), tok)
    m = spec.new_matcher()
    row = torch.zeros(bitmask_words(tok.vocab_size), dtype=torch.int32)
    m.fill_bitmask(row)
    allowed = [t for t in range(tok.vocab_size) if (int(row[t // 32]) >> (t % 32)) & 1]
    texts = {tok.decode([t]) for t in allowed}
    assert "yes" in texts and "no" in texts and all("yes".startswith(x) or "no".startswith(x) for x in texts)
    for t in tok.encode("yes", add_special_tokens=False):
        assert m.accept_token(t)
    assert m.is_terminated()
    # A rejected token puts the matcher in error: it then allows only end-of-sequence, and ends.
    m2 = spec.new_matcher()
    assert not m2.accept_token(tok.encode("maybe", add_special_tokens=False)[0])
    row.zero_()
    m2.fill_bitmask(row)
    eos = get_compiler(tok).eos_token_id
    assert [t for t in range(tok.vocab_size) if (int(row[t // 32]) >> (t % 32)) & 1] == [eos]
    assert m2.is_terminated()


def test_ascii_classes() -> None:
    assert ascii_classes(r"\d+\.\D[\w-]\\d") == r"[0-9]+\.[^0-9][[0-9A-Za-z_]-]\\d"


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": {
        "$defs": {"unit": {"enum": ["c", "f"]}}, "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"$ref": "#/$defs/unit"}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "noop"}},
]


def test_tool_definitions_validated(tok: Any) -> None:
    comp = get_compiler(tok)
    with pytest.raises(StructuredOutputError, match="function 'bad'.*not") as ei:
        plan_tools(parse_tools([{"type": "function", "function": {"name": "bad", "parameters": {
            "type": "object", "properties": {"a": {"not": {}}}}}}]), "auto", True, comp, "hermes")
    assert ei.value.param == "tools[0]"
    for bad in ([{"type": "function"}], [{"type": "function", "function": {"name": ""}}],
                [{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}]):
        with pytest.raises(StructuredOutputError):
            parse_tools(bad)
    tools = parse_tools(TOOLS)
    with pytest.raises(StructuredOutputError, match="not among the tools"):
        plan_tools(tools, {"type": "function", "function": {"name": "missing"}}, True, comp, "hermes")
    with pytest.raises(StructuredOutputError, match="tool_choice"):
        plan_tools(tools, "sometimes", True, comp, "hermes")
    with pytest.raises(StructuredOutputError, match="requires tools"):
        plan_tools([], "required", True, comp, "hermes")


def test_tool_plans(tok: Any) -> None:
    comp = get_compiler(tok)
    tools = parse_tools(TOOLS)
    assert plan_tools(tools, "none", True, comp, "hermes").parser is None
    auto = plan_tools(tools, None, False, comp, "hermes")
    assert auto.grammar is None and auto.parser is not None and auto.parser.max_calls == 1
    named = plan_tools(tools, {"type": "function", "function": {"name": "get_weather"}}, True, comp, "hermes")
    assert named.forced and named.grammar is not None
    assert accepts(named.grammar, tok, '{"city": "Paris", "unit": "c"}')
    assert not accepts(named.grammar, tok, '{"city": "Paris", "unit": "k"}')
    req = plan_tools(tools, "required", True, comp, "hermes")
    assert req.grammar is not None and req.parser is not None
    two = '[{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "f"}}, {"name": "noop", "parameters": {}}]'
    assert accepts(req.grammar, tok, two)  # $ref inside a tool's parameters resolves in its own root
    assert not accepts(req.grammar, tok, "[]")
    assert not accepts(req.grammar, tok, '[{"name": "other", "parameters": {}}]')
    single = plan_tools(tools, "required", False, comp, "hermes")
    assert single.grammar is not None and not accepts(single.grammar, tok, two)
    assert "start" in required_grammar(tools, True)


def test_tool_chat_template(tok: Any) -> None:
    assert tool_template_for(tok.hf.chat_template) == chatml_tools_template()  # SmolLM2's has no tools
    assert tool_template_for("{% if tools %}...{% endif %}") is None
    assert detect_tool_parser(None) == "hermes"
    assert detect_tool_parser("{% if tools %}<|python_tag|>{% endif %}") == "llama3_json"
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "20 C"}]
    text = tok.apply_chat_template(msgs, tools=TOOLS, chat_template=chatml_tools_template())
    assert '"name": "get_weather", "description": "Current weather"' in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "c"}}\n</tool_call><|im_end|>') in text
    assert "<|im_start|>user\n<tool_response>\n20 C\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_a_byte_level_vocabulary_under_a_sentencepiece_style_decoder_chain(tok: Any) -> None:
    """transformers 5.17 converts SmolLM2's GGUF tokenizer with ByteFallback, Fuse, Replace and ByteLevel
    decoders and byte_fallback on (5.25 writes a plain ByteLevel decoder). llguidance then read "Ġ" as itself,
    not a space, and on the GPU machine a JSON schema's masks let `{"city":` go on with `:`."""
    import llguidance
    import tokenizers

    from ember.structured.llguidance_backend import byte_level_view
    from ember.tokenizer import Tokenizer

    spec = json.loads(tok.hf.backend_tokenizer.to_str())
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, byte_level]}
    spec["model"]["byte_fallback"] = True
    hybrid = json.dumps(spec)
    text = 'Hi {"city": "New York"}, café ☃'
    ids = tok.encode(text, add_special_tokens=False)
    assert tokenizers.Tokenizer.from_str(hybrid).decode(ids) == tok.decode(ids) == text  # HF decoding: fine
    space_quote = tok.encode(' "', add_special_tokens=False)
    assert len(space_quote) == 1
    assert llguidance.LLTokenizer(byte_level_view(hybrid)).decode_bytes(ids) == text.encode()
    # (Compared as booleans: pytest's diff of two tokenizer.json strings runs for minutes.)
    plain = json.dumps({**spec, "decoder": byte_level, "model": {**spec["model"], "byte_fallback": False}})
    unchanged = byte_level_view(plain) == plain  # a plain ByteLevel decoder (transformers 5.25's) as it was
    assert unchanged
    spec["model"]["vocab"]["<0x0A>"] = len(spec["model"]["vocab"])  # byte tokens: ByteFallback means something
    unchanged = byte_level_view(json.dumps(spec)) == json.dumps(spec)
    assert unchanged

    class Converted:  # the HF tokenizer as transformers 5.17 hands it over
        backend_tokenizer = tokenizers.Tokenizer.from_str(hybrid)
        all_special_ids = tok.hf.all_special_ids
        eos_token_id = tok.hf.eos_token_id

        def __len__(self) -> int:
            return len(tok.hf)

    converted = Tokenizer(Converted(), tok.eos_token_ids)
    converted.encode = tok.encode  # type: ignore[method-assign]
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    m = compile_structured(StructuredOutputs(json=schema), converted).new_matcher()
    assert all(m.accept_token(t) for t in tok.encode('{"city":', add_special_tokens=False))
    row = torch.zeros(bitmask_words(converted.vocab_size), dtype=torch.int32)
    m.fill_bitmask(row)
    allowed = {t for t in range(converted.vocab_size) if (int(row[t // 32]) >> (t % 32)) & 1}
    assert space_quote[0] in allowed and tok.encode(":", add_special_tokens=False)[0] not in allowed
