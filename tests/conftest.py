"""Shared fixtures: the embedded model loaded once per test session."""

from __future__ import annotations

import os

import pytest

# Tests never touch the network: the Hugging Face hub is consulted from the local cache only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smol_llm():
    from ember import LLM

    return LLM()


@pytest.fixture(scope="session")
def hf_smol():
    """HF transformers' own reading of the same GGUF: the reference implementation."""
    import torch
    from transformers import AutoModelForCausalLM

    from ember.model.loader import embedded_gguf_path

    path = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()
