"""Tokenizer loading (HF directory or GGUF metadata) and the chat template.

transformers is imported only where it is needed (a GGUF's first conversion, a directory that ember.fast_tokenizer
does not read): on the GPU machine its import costs ~7 s of the cold start.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from ember.fast_tokenizer import load_fast_tokenizer

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("EMBER_CACHE_DIR", Path.home() / ".cache" / "ember"))


def cache_key(path: Path) -> str:
    """Identifies a file's version for derived caches (path, size and modification time)."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _from_dir(path: str | Path) -> Any:
    """A Hugging Face-style tokenizer for a directory: ember.fast_tokenizer's where it reads the directory as
    transformers would, else transformers' own."""
    fast = load_fast_tokenizer(path)
    if fast is not None:
        return fast
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _gguf_tokenizer(gguf_path: Path) -> Any:
    """Convert the GGUF's tokenizer once (transformers parses the whole file: ~9 s) and reuse the result."""
    cached = cache_root() / "tokenizers" / cache_key(gguf_path)
    if (cached / "tokenizer_config.json").exists():
        try:
            return _from_dir(cached)
        except Exception:  # a half-written or stale cache entry: rebuild it
            logger.warning("rebuilding tokenizer cache %s", cached)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    try:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        tok.save_pretrained(tmp)
        tmp.replace(cached) if not cached.exists() else None
    except OSError as e:  # read-only home: just don't cache
        logger.info("tokenizer cache not written: %s", e)
        return tok
    # Read back as every later start will, so that the first start behaves the same.
    return load_fast_tokenizer(cached) or tok


class Tokenizer:
    """What the engine and the server need from a tokenizer, over a Hugging Face fast tokenizer (`hf`: a
    transformers tokenizer or an ember.fast_tokenizer.FastTokenizer, which has the same interface in the parts
    used here)."""

    def __init__(self, hf: Any, eos_token_ids: set[int], chat_template: str | None = None):
        self.hf = hf
        self.eos_token_ids = eos_token_ids
        if chat_template is not None:
            self.hf.chat_template = chat_template
        self.vocab_size = len(hf)
        self.all_special_ids = set(hf.all_special_ids)

    @classmethod
    def load(cls, source: str | Path, gguf_file: str | Path | None, eos_token_ids: set[int],
             chat_template: str | None = None) -> Tokenizer:
        if gguf_file is not None:
            hf = _gguf_tokenizer(Path(gguf_file))
        else:
            hf = _from_dir(source)
        if hf.eos_token_id is not None:
            eos_token_ids = eos_token_ids | {hf.eos_token_id}
        return cls(hf, eos_token_ids, chat_template)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(ids)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, chat_template: str | None = None,
                            **kwargs: Any) -> str:
        """Render a conversation to the prompt text (special tokens included; encode it without adding more)."""
        if not (chat_template or self.hf.chat_template):
            raise ValueError("this model has no chat template; pass one with --chat-template")
        return self.hf.apply_chat_template(messages, tools=tools, chat_template=chat_template,
                                           add_generation_prompt=add_generation_prompt, tokenize=False,
                                           **kwargs)


def load_chat_template(value: str | None) -> str | None:
    """--chat-template takes a file path or the template itself."""
    if value is None:
        return None
    p = Path(value)
    if len(value) < 4096 and p.is_file():
        return p.read_text()
    return value
