"""Clear errors for what ember cannot load or run."""

from __future__ import annotations

import json

import pytest

from ember.config import EngineConfig
from ember.model.config import ModelArchConfig, UnsupportedModelError
from ember.model.loader import ModelNotFoundError, resolve_model


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"):
        ModelArchConfig.from_hf({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


def test_unsupported_rope_scaling():
    cfg = json.loads(open("ember/configs/tiny-llama.json").read())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelArchConfig.from_hf(cfg)


def test_missing_model_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        resolve_model(EngineConfig(model="some-org/some-model"))


def test_unknown_dummy_config_lists_shipped_ones():
    with pytest.raises(ModelNotFoundError, match="llama-3.1-8b-instruct"):
        resolve_model(EngineConfig(model="no-such-config", load_format="dummy"))


def test_llama31_8b_config_shapes():
    arch = ModelArchConfig.from_hf(resolve_model(EngineConfig(model="llama-3.1-8b-instruct",
                                                             load_format="dummy")).hf_config)
    assert (arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim, arch.vocab_size) == (32, 8, 128, 128256)
    assert arch.rope_scaling["rope_type"] == "llama3" and arch.eos_token_ids == [128001, 128008, 128009]
    from ember.bench.roofline import param_count

    assert abs(param_count(arch) - 8.03e9) < 0.01e9
