"""A tokenizer directory read with `tokenizers` and jinja2 alone, as transformers would read it, without importing
transformers (on the GPU machine `from transformers import AutoTokenizer` costs ~7 s of imports: it pulls in
torch's sympy, scikit-learn, scipy and pandas).

Only directories whose reading by transformers is plain are taken: a `tokenizer.json` that transformers uses as
it is (class `TokenizersBackend`/`PreTrainedTokenizerFast`, no settings that make transformers rewrite it, named
special tokens that are already special added tokens) and one chat template. `load_fast_tokenizer` returns None
for anything else, and the caller loads it with transformers. Encoding and decoding are the `tokenizers` calls
transformers makes; the chat template is rendered the way transformers 5 renders it (same Jinja environment,
same globals, same message normalization). tests/engine/test_fast_tokenizer.py checks both against
transformers.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, processors

logger = logging.getLogger(__name__)

# transformers' named special tokens, in its order (all_special_ids follows it).
SPECIAL_TOKEN_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                            "mask_token")
# Classes for which AutoTokenizer uses tokenizer.json as it is (PreTrainedTokenizerFast is TokenizersBackend's
# old name).
PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
# config.json model types whose registered tokenizer class does not override a plain class in tokenizer_config.
PLAIN_MODEL_TYPES = ("llama",)
# tokenizer_config keys with which transformers changes the backend or its use: such directories go to it.
_REWRITING_KEYS = ("add_bos_token", "add_eos_token", "split_special_tokens", "fix_mistral_regex", "auto_map",
                   "additional_special_tokens", "extra_special_tokens", "model_specific_special_tokens",
                   "fast_tokenizer_files", "tokenizer_file")
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


def load_fast_tokenizer(path: str | Path) -> FastTokenizer | None:
    """The directory's tokenizer without transformers, or None where transformers must read it."""
    d = Path(path)
    try:
        reason = _unsupported(d)
        if reason is None:
            return FastTokenizer.from_dir(d)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # a file it cannot read: transformers
        reason = f"{type(e).__name__}: {e}"
    logger.info("tokenizer %s: loading with transformers (%s)", d, reason)
    return None


def _token_content(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TypeError(f"unexpected special token {value!r}")


def _unsupported(d: Path) -> str | None:
    """Why transformers must read this directory (None: the fast path reads it as transformers would)."""
    if tuple(int(x) for x in jinja2.__version__.split(".")[:3] if x.isdigit()) < (3, 1, 6):
        return f"jinja2 {jinja2.__version__} (transformers requires 3.1.6 for chat templates)"
    if not (d / "tokenizer.json").is_file() or not (d / "tokenizer_config.json").is_file():
        return "no tokenizer.json and tokenizer_config.json"
    for name in ("added_tokens.json", "chat_template.json", "additional_chat_templates"):
        if (d / name).exists():
            return f"has {name}"
    cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") not in PLAIN_CLASSES:
        return f"tokenizer_class {cfg.get('tokenizer_class')!r}"
    present = [k for k in _REWRITING_KEYS if cfg.get(k) not in (None, False, [], {})]
    if present:
        return f"tokenizer_config sets {', '.join(present)}"
    if cfg.get("clean_up_tokenization_spaces") and not _ignores_bpe_clean_up(cfg):
        return "tokenizer_config sets clean_up_tokenization_spaces"
    others = [k for k, v in cfg.items() if k.endswith("_token") and k not in SPECIAL_TOKEN_ATTRIBUTES
              and isinstance(v, (str, dict))]
    if others:
        return f"model-specific special tokens {', '.join(others)}"
    if not isinstance(cfg.get("chat_template"), (str, type(None))):
        return "several chat templates"
    if (d / "config.json").is_file():
        model_type = json.loads((d / "config.json").read_text(encoding="utf-8")).get("model_type")
        if model_type not in PLAIN_MODEL_TYPES:
            return f"model_type {model_type!r}"
    if (d / "special_tokens_map.json").is_file():
        stm = json.loads((d / "special_tokens_map.json").read_text(encoding="utf-8"))
        if any(k not in SPECIAL_TOKEN_ATTRIBUTES or _token_content(v) != _token_content(cfg.get(k))
               for k, v in stm.items()):
            return "special_tokens_map.json differs from tokenizer_config.json"
    return None


def _ignores_bpe_clean_up(cfg: Mapping[str, Any]) -> bool:
    """Whether the installed transformers decodes a BPE model without clean_up_tokenization_spaces' rewriting
    although tokenizer_config asks for it (transformers >= 5.7 does, unless told it must; Llama 3.1's and
    transformers 5.17's GGUF conversions set it). Read from the package metadata: importing transformers is
    what the fast path avoids. `FastTokenizer.from_dir` checks that the model is BPE."""
    from importlib import metadata

    try:
        version = tuple(int(p) for p in metadata.version("transformers").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return version >= (5, 7) and not cfg.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")


class FastTokenizer:
    """The part of a Hugging Face fast tokenizer's interface that ember uses, over a `tokenizers.Tokenizer`."""

    def __init__(self, backend: Tokenizer, special_tokens: Mapping[str, str | None],
                 chat_template: str | None = None, name_or_path: str = "") -> None:
        self._tokenizer = backend
        self._special = {k: special_tokens.get(k) for k in SPECIAL_TOKEN_ATTRIBUTES}
        self.chat_template = chat_template
        self.name_or_path = name_or_path
        # What transformers leaves set after its first encode: no truncation, no padding, specials matched whole.
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = False
        if backend.post_processor is None:  # transformers installs the identity template
            backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1",
                                                                   special_tokens=[])

    @classmethod
    def from_dir(cls, d: Path) -> FastTokenizer:
        cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
        backend = Tokenizer.from_file(str(d / "tokenizer.json"))
        if backend.padding is not None:  # transformers takes pad_token from it: its reading is not plain
            raise ValueError("tokenizer.json sets padding")
        if cfg.get("clean_up_tokenization_spaces") and type(backend.model).__name__ != "BPE":
            raise ValueError("clean_up_tokenization_spaces on a model other than BPE (transformers applies it)")
        added = {t.content: (i, t) for i, t in backend.get_added_tokens_decoder().items()}
        # Entries of added_tokens_decoder that tokenizer.json lacks would be added by transformers.
        for idx, entry in (cfg.get("added_tokens_decoder") or {}).items():
            have = added.get(entry.get("content"))
            if have is None or have[0] != int(idx) or any(
                    getattr(have[1], f) != entry.get(f, getattr(have[1], f)) for f in _ADDED_TOKEN_FIELDS):
                raise ValueError(f"added token {idx} {entry.get('content')!r} differs from tokenizer.json")
        special = {k: _token_content(cfg.get(k)) for k in SPECIAL_TOKEN_ATTRIBUTES}
        for k, v in special.items():
            # A named special token that is not a special added token yet would be added (or changed) by it.
            if v is not None and (v not in added or not added[v][1].special or added[v][1].normalized
                                  or added[v][1].lstrip or added[v][1].rstrip or added[v][1].single_word):
                raise ValueError(f"{k} {v!r} is not a plain special added token of tokenizer.json")
        template_file = d / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else cfg.get("chat_template")
        return cls(backend, special, template, str(d))

    # ----------------------------------------------------------------------------------- vocabulary

    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {k: v for k, v in self._special.items() if v is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self.special_tokens_map.values()))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._token_id(t) for t in self.all_special_tokens]

    def _token_id(self, token: str) -> int:
        i = self._tokenizer.token_to_id(token)
        if i is None:
            unk = self._special["unk_token"]
            unk_id = self._tokenizer.token_to_id(unk) if unk is not None else None
            if unk_id is None:
                raise KeyError(f"{token!r} is not in the vocabulary and there is no unk token")
            return unk_id
        return i

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        return self._token_id(tokens) if isinstance(tokens, str) else [self._token_id(t) for t in tokens]

    def _special_id(self, name: str) -> int | None:
        token = self._special[name]
        return None if token is None else self._token_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def bos_token(self) -> str | None:
        return self._special["bos_token"]

    @property
    def eos_token(self) -> str | None:
        return self._special["eos_token"]

    # ----------------------------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: int | list[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode([ids] if isinstance(ids, int) else ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> Any:
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skip]

    # ----------------------------------------------------------------------------------- chat template

    def get_chat_template(self, chat_template: str | None = None) -> str:
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set and no "
                             "template argument was passed!")
        return template

    def apply_chat_template(self, conversation: list[Any], tools: list[dict[str, Any]] | None = None,
                            documents: list[dict[str, Any]] | None = None, chat_template: str | None = None,
                            add_generation_prompt: bool = False, tokenize: bool = False, **kwargs: Any) -> str:
        """transformers' `apply_chat_template(..., tokenize=False)` for one conversation."""
        if tokenize:
            raise NotImplementedError("render with tokenize=False, then encode without special tokens")
        template = self.get_chat_template(chat_template)
        if isinstance(conversation, (list, tuple)) and len(conversation) == 0:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise ValueError("Tools should be JSON schemas (dicts)")
        if documents is not None and not all(isinstance(doc, dict) for doc in documents):
            raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
        messages = _plain_template_data(_normalize_chat_messages(conversation))
        template_kwargs = _plain_template_data({**self.special_tokens_map, **kwargs})
        return _compile_template(template).render(
            messages=_alias_reasoning_fields(messages), tools=_plain_template_data(tools),
            documents=_plain_template_data(documents), add_generation_prompt=add_generation_prompt,
            **template_kwargs)

    def save_pretrained(self, save_directory: str | Path) -> None:
        """tokenizer.json, tokenizer_config.json and chat_template.jinja, which this class (and transformers)
        reads back."""
        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(d / "tokenizer.json"))
        cfg: dict[str, Any] = {"tokenizer_class": "TokenizersBackend", "backend": "tokenizers",
                               **self.special_tokens_map}
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        if self.chat_template is not None:
            (d / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")


# --------------------------------------------------------------------------- transformers' chat rendering

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _to_dicts(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _to_dicts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_dicts(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_dicts(v) for v in value)
    if callable(getattr(value, "model_dump", None)):  # pydantic models (the OpenAI SDK's messages)
        return _to_dicts(value.model_dump())
    return value


def _normalize_chat_messages(conversation: Any) -> list[dict[str, Any]]:
    """Messages as dicts without the keys whose value is None (templates handle a missing key, not a None)."""
    out = []
    for message in _to_dicts(getattr(conversation, "messages", conversation)):
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}.")
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def _plain_template_data(value: Any) -> Any:
    """What the sandbox may see: plain JSON types only (str/int/float subclasses are cast back)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_template_data(k): _plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_template_data(v) for v in value)
    if type(value).__module__ == "numpy" and callable(getattr(value, "item", None)):
        return _plain_template_data(value.item())
    if callable(getattr(value, "model_dump", None)):
        return _plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning_fields(chat: list[Any]) -> list[Any]:
    out = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant tokens for training masks): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` in templates, without attribute access to the dict type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 -- Jinja's own signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
                "Please rename the attribute.")


@functools.lru_cache(maxsize=32)
def _compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)

