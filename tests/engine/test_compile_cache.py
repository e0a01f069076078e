"""`--compile-cache-dir`: Triton's kernel cache goes where the user says (a volume kept across launches)."""

from __future__ import annotations

import os

from ember.config import EngineConfig
from ember.engine.llm_engine import LLMEngine


def test_compile_cache_dir_is_created_and_handed_to_triton(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    cache = tmp_path / "vol" / "jit"
    LLMEngine(EngineConfig(model="tiny-llama", load_format="dummy", max_model_len=64,
                           num_gpu_blocks_override=8, compile_cache_dir=str(cache)))
    assert cache.is_dir()
    assert os.environ["TRITON_CACHE_DIR"] == str(cache)
