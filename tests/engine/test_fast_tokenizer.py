"""ember.fast_tokenizer reads a tokenizer directory as transformers does (encode, decode, special tokens, chat
template rendering), hands anything else to transformers, and keeps transformers out of `ember serve`'s imports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ember.fast_tokenizer import FastTokenizer, load_fast_tokenizer

TEXTS = ["Hello world", " leading space", "a  b\n\n c\t", "<|im_start|>user\nhi<|im_end|>", "emoji 😀 ünï 東京",
         "don't , . ? ! 's 've", "", "<|endoftext|><|im_end|> after"]

# Llama 3.1's template in miniature: everything transformers' Jinja environment provides is used.
LLAMA_LIKE_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%Y") %}{%- endif %}
{%- if messages|length == 0 %}{{ raise_exception("no messages") }}{% endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|im_start|>system\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Year: " + date_string + "\\n" + system_message }}
{%- if tools is not none %}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- "<|im_end|>" }}
{%- set ns = namespace(calls=0) %}
{%- set extra = dict(a=1) %}
{%- for message in messages %}
    {%- if loop.index > 20 %}{% break %}{% endif %}
    {%- if message.role == 'assistant' and message.tool_calls is defined %}
        {%- set ns.calls = ns.calls + 1 %}
        {{- '<|im_start|>assistant\\n{"name": "' + message.tool_calls[0].function.name + '", "parameters": ' }}
        {{- message.tool_calls[0].function.arguments | tojson }}
        {{- "}<|im_end|>" }}
    {%- elif message.role == 'tool' %}
        {{- "<|im_start|>ipython\\n" }}
        {%- if message.content is mapping %}{{- message.content | tojson }}{%- else %}{{- message.content }}{%- endif %}
        {{- "<|im_end|>" }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\\n' }}
        {%- if message.reasoning_content is defined %}
            {{- '<think>' + message.reasoning_content + '</think>' }}
        {%- endif %}
        {% generation %}{{- message['content'] | trim }}{% endgeneration %}
        {{- '<|im_end|>' }}
    {%- endif %}
{%- endfor %}
{{- "calls=" ~ ns.calls ~ extra.a }}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

CHATS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "hi"}]},
    {"messages": [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4", "reasoning_content": "easy"},
                  {"role": "user", "content": "and 3+3?"}]},
    {"messages": [{"role": "user", "content": "weather?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "c1", "type": "function", "function": {"name": "get", "arguments": {"city": "Zürich"}}}]},
                  {"role": "tool", "content": "sunny <b>", "tool_call_id": "c1"}],
     "tools": [{"type": "function", "function": {"name": "get", "description": "weather & more",
                                                 "parameters": {"type": "object", "properties": {
                                                     "city": {"type": "string"}}}}}]},
    {"messages": []},  # the template raises
]


@pytest.fixture(scope="module")
def embedded_dir() -> Path:
    """The embedded model's tokenizer as converted from its GGUF (what `ember serve` loads by default)."""
    from ember.model.loader import embedded_gguf_path
    from ember.tokenizer import _gguf_tokenizer, cache_key, cache_root

    path = embedded_gguf_path()
    _gguf_tokenizer(path)
    return cache_root() / "tokenizers" / cache_key(path)


@pytest.fixture(scope="module")
def llama_like_dir(embedded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-3-style directory: PreTrainedTokenizerFast, a BOS-adding post-processor, config.json,
    added_tokens_decoder, special_tokens_map.json and the template in tokenizer_config.json."""
    d = tmp_path_factory.mktemp("llama_like")
    tok = json.loads((embedded_dir / "tokenizer.json").read_text())
    bos = "<|im_start|>"
    bos_id = next(t["id"] for t in tok["added_tokens"] if t["content"] == bos)
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    (d / "tokenizer.json").write_text(json.dumps(tok))
    added = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in tok["added_tokens"]}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "<|im_end|>",
           "added_tokens_decoder": added, "chat_template": LLAMA_LIKE_TEMPLATE, "model_max_length": 131072,
           "model_input_names": ["input_ids", "attention_mask"], "clean_up_tokenization_spaces": False}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": bos, "lstrip": False},
                                                           "eos_token": "<|im_end|>"}))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return d


def _drops_none_keys() -> bool:
    """transformers >= 5.2x drops None-valued message keys and aliases reasoning fields, as FastTokenizer does;
    older versions render them as given."""
    from transformers.utils import chat_template_utils

    return hasattr(chat_template_utils, "_normalize_chat_messages")


def _outcome(fn: Any) -> tuple[str, str]:
    try:
        return "ok", fn()
    except Exception as e:  # both implementations must fail alike
        return type(e).__name__, str(e)


def _assert_same(fast: FastTokenizer, hf: Any) -> None:
    assert json.loads(fast.backend_tokenizer.to_str()) == json.loads(hf.backend_tokenizer.to_str())
    assert len(fast) == len(hf)
    assert fast.all_special_ids == hf.all_special_ids
    assert fast.special_tokens_map == hf.special_tokens_map
    assert (fast.bos_token_id, fast.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert fast.chat_template == hf.chat_template
    for text in TEXTS:
        for add in (True, False):
            ids = hf.encode(text, add_special_tokens=add)
            assert fast.encode(text, add_special_tokens=add) == ids, text
            assert fast.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
            for skip in (True, False):
                assert fast.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    for tid in (0, 1, 2, 100, len(hf) - 1):
        assert fast.convert_ids_to_tokens(tid) == hf.convert_ids_to_tokens(tid)
    templates = [None, LLAMA_LIKE_TEMPLATE]
    for chat in CHATS if _drops_none_keys() else CHATS[:2] + CHATS[3:]:  # [2] has a None content
        for template in templates:
            for gen in (True, False):
                def render(t: Any, chat: dict[str, Any] = chat, template: str | None = template,
                           gen: bool = gen) -> str:
                    return t.apply_chat_template(chat["messages"], tools=chat.get("tools"), chat_template=template,
                                                 add_generation_prompt=gen, tokenize=False)
                assert _outcome(lambda: render(fast)) == _outcome(lambda: render(hf)), (chat, template, gen)


def test_embedded_tokenizer_matches_transformers(embedded_dir: Path) -> None:
    from transformers import AutoTokenizer

    fast = load_fast_tokenizer(embedded_dir)
    assert fast is not None
    _assert_same(fast, AutoTokenizer.from_pretrained(embedded_dir))


def test_llama_like_directory_matches_transformers(llama_like_dir: Path) -> None:
    from transformers import AutoTokenizer

    fast = load_fast_tokenizer(llama_like_dir)
    assert fast is not None
    hf = AutoTokenizer.from_pretrained(llama_like_dir)
    assert fast.encode("hi")[0] == fast.bos_token_id  # the post-processor adds BOS
    _assert_same(fast, hf)


def test_saved_directory_reads_back(embedded_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    fast = load_fast_tokenizer(embedded_dir)
    assert fast is not None
    fast.save_pretrained(tmp_path)
    again = load_fast_tokenizer(tmp_path)
    assert again is not None
    _assert_same(again, AutoTokenizer.from_pretrained(tmp_path))


@pytest.mark.parametrize("change", [
    {"tokenizer_class": "LlamaTokenizer"},
    {"tokenizer_class": None},
    {"add_bos_token": True},
    {"clean_up_tokenization_spaces": True,
     "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output": True},
    {"split_special_tokens": True},
    {"additional_special_tokens": ["<|im_start|>"]},
    {"image_token": "<|im_start|>"},
    {"unk_token": "not-an-added-token"},
    {"chat_template": [{"name": "default", "template": "x"}]},
    {"config.json": {"model_type": "qwen2"}},
    {"special_tokens_map.json": {"bos_token": "<|endoftext|>"}},
    {"added_tokens.json": {"<x>": 49152}},
])
def test_other_directories_go_to_transformers(llama_like_dir: Path, tmp_path: Path, change: dict[str, Any]) -> None:
    d = tmp_path / "tok"
    shutil.copytree(llama_like_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    for key, value in change.items():
        if key.endswith(".json"):
            (d / key).write_text(json.dumps(value))
        elif value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_fast_tokenizer(d) is None


def _transformers_ignores_bpe_clean_up() -> bool:
    """transformers >= 5.7 skips clean_up_tokenization_spaces for BPE models unless told it must."""
    import transformers

    return tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (5, 7)


def test_clean_up_tokenization_spaces_on_a_bpe_model(llama_like_dir: Path, tmp_path: Path) -> None:
    """Llama 3.1's tokenizer_config (and transformers 5.17's GGUF conversion) set clean_up_tokenization_spaces;
    the transformers in use decides whether decoding rewrites " ." and " 's", and the fast path follows it."""
    from transformers import AutoTokenizer

    d = tmp_path / "tok"
    shutil.copytree(llama_like_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["clean_up_tokenization_spaces"] = True
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    fast = load_fast_tokenizer(d)
    if not _transformers_ignores_bpe_clean_up():
        assert fast is None
        return
    assert fast is not None
    hf = AutoTokenizer.from_pretrained(d)
    ids = hf.encode("don't , . ? ! 's 've", add_special_tokens=False)
    assert fast.decode(ids) == hf.decode(ids) == "don't , . ? ! 's 've"
    _assert_same(fast, hf)


def test_clean_up_tokenization_spaces_on_another_model_goes_to_transformers(tmp_path: Path) -> None:
    """transformers applies the clean-up to WordPiece and other models: the fast path does not read those."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, ",": 2, "'s": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["[UNK]"])
    backend.save(str(tmp_path / "tokenizer.json"))
    cfg = {"tokenizer_class": "TokenizersBackend", "unk_token": "[UNK]", "clean_up_tokenization_spaces": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_fast_tokenizer(tmp_path) is not None
    cfg["clean_up_tokenization_spaces"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_fast_tokenizer(tmp_path) is None


def test_padding_in_tokenizer_json_goes_to_transformers(llama_like_dir: Path, tmp_path: Path) -> None:
    """transformers takes pad_token from tokenizer.json's padding section; the fast path does not read it."""
    d = tmp_path / "tok"
    shutil.copytree(llama_like_dir, d)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                     "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    assert load_fast_tokenizer(d) is None


def test_tokenizer_load_uses_the_fast_path(embedded_dir: Path) -> None:
    from ember.tokenizer import Tokenizer

    tok = Tokenizer.load(embedded_dir, None, set())
    assert isinstance(tok.hf, FastTokenizer)
    assert tok.eos_token_ids == {tok.hf.eos_token_id}


def test_serve_imports_stay_light(embedded_dir: Path) -> None:
    """`ember serve`'s imports and an engine load leave transformers (~7 s on the GPU machine) and torch._dynamo
    with sympy (~5 s there, pulled in by meta-device tensor ops) unimported."""
    code = ("import sys, ember.cli, ember.server.launcher, ember.server.faults, ember.engine.async_engine\n"
            "from ember.config import EngineConfig\n"
            "from ember.engine.llm_engine import LLMEngine\n"
            f"LLMEngine(EngineConfig(model='tiny-llama', load_format='dummy', tokenizer={str(embedded_dir)!r}, "
            "device='cpu', max_model_len=256, kv_cache_memory_bytes=2**24))\n"
            "heavy = ('transformers', 'openai', 'sympy', 'torch._dynamo', 'torch._inductor')\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
