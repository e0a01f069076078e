"""Loading a safetensors checkpoint directory: every parameter gets exactly its checkpoint values (q/k/v and
gate/up fused), whether the bytes are read in place or cast; broken checkpoints are refused before any reading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ember.config import EngineConfig
from ember.model import loader
from ember.model.config import ModelArchConfig
from ember.model.loader import build_model, iter_safetensors_weights, load_weights, resolve_model

TINY = json.loads((Path(__file__).resolve().parents[2] / "ember/configs/tiny-llama.json").read_text())


def _fused(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under ember's parameter names."""
    w = dict(weights)
    for i in range(TINY["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        w[pre + "self_attn.qkv_proj.weight"] = torch.cat([w.pop(pre + f"self_attn.{p}_proj.weight") for p in "qkv"])
        w[pre + "mlp.gate_up_proj.weight"] = torch.cat([w.pop(pre + f"mlp.{p}_proj.weight") for p in ("gate", "up")])
    return w


def _build(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    source = resolve_model(EngineConfig(model=str(path)))
    return build_model(source, ModelArchConfig.from_hf(source.hf_config), dtype, torch.device("cpu"), 64, 0)


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float32])
def test_parameters_are_the_checkpoint_values(tmp_path: Path, model_dtype: torch.dtype, tiny_checkpoints) -> None:
    """bf16 checkpoint: read in place into a bf16 model, cast into an fp32 one."""
    weights = tiny_checkpoints.weights(torch.bfloat16)
    model = _build(tiny_checkpoints.write(tmp_path, weights), model_dtype)
    want = _fused(weights)
    got = dict(model.named_parameters())
    assert sorted(got) == sorted(want)
    for name, p in got.items():
        assert p.dtype == model_dtype and torch.equal(p.data, want[name].to(model_dtype)), name


def test_same_parameters_as_the_one_tensor_at_a_time_path(tmp_path: Path, tiny_checkpoints) -> None:
    path = tiny_checkpoints.write(tmp_path, tiny_checkpoints.weights(), shards=3)
    fast = _build(path, torch.float32)
    slow = _build(path, torch.float32)
    for p in slow.parameters():
        p.data.zero_()
    load_weights(slow, iter_safetensors_weights(path), None)
    for (name, a), (_, b) in zip(fast.named_parameters(), slow.named_parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(("change", "message"), [
    ("missing", "missing 1 tensors"),
    ("stray", "has no place in the model"),
    ("shape", "checkpoint shape"),
    ("fp8", "declares no FP8 quantization"),
])
def test_broken_checkpoints_are_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       change: str, message: str, tiny_checkpoints) -> None:
    weights = tiny_checkpoints.weights()
    name = "model.layers.1.mlp.up_proj.weight"
    if change == "missing":
        del weights[name]
    elif change == "stray":
        weights["model.layers.1.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    elif change == "shape":
        weights[name] = weights[name][:-1]
    else:
        weights[name] = weights[name].to(torch.float8_e4m3fn)
    path = tiny_checkpoints.write(tmp_path, weights)

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were read before the checkpoint was checked")

    monkeypatch.setattr(loader, "read_tensors", no_reading)
    with pytest.raises(ValueError, match=message):
        _build(path, torch.float32)
