"""FP8 checkpoints in the compressed-tensors format (as RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8 ships them).
Dequantized (the default on CPUs, `--quantization none` anywhere): every parameter is exactly
weight.float() * weight_scale in the model's dtype, and the engine generates what the same weights saved as a
plain checkpoint generate. With FP8 matmuls (the default on sm90/sm100 GPUs): the checkpoint's FP8 values."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from ember import LLM, SamplingParams
from ember.config import EngineConfig
from ember.model.config import ModelArchConfig, UnsupportedModelError
from ember.model.loader import build_model, resolve_model

TINY = json.loads((Path(__file__).resolve().parents[2] / "ember/configs/tiny-llama.json").read_text())
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def _fp8_quantization_config(strategy: str) -> dict[str, Any]:
    """What llm-compressor writes: static per-tensor activations with per-tensor weights (FP8), dynamic per-token
    activations with per-channel weights (FP8-dynamic)."""
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False,
               "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax"}
    if strategy == "tensor":
        inputs = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
    else:
        inputs = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": inputs, "output_activations": None}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None}


def _random_weights(seed: int) -> dict[str, torch.Tensor]:
    """HF-layout (unfused) bf16 weights for the tiny config."""
    g = torch.Generator().manual_seed(seed)
    h, inter, hd = TINY["hidden_size"], TINY["intermediate_size"], TINY["hidden_size"] // TINY["num_attention_heads"]
    q, kv = TINY["num_attention_heads"] * hd, TINY["num_key_value_heads"] * hd
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}

    def rand(*shape: int, std: float = 0.05) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    w = {"model.embed_tokens.weight": rand(TINY["vocab_size"], h, std=1.0),
         "lm_head.weight": rand(TINY["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for i in range(TINY["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        w[pre + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        w[pre + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        for j, (proj, shape) in enumerate(shapes.items()):
            # Row magnitudes that differ per projection and per row: per-tensor scales then differ within the
            # fused qkv / gate_up parameters, and per-channel scales differ from row to row.
            w[pre + proj + ".weight"] = rand(*shape) * (1 + j) * torch.linspace(0.5, 2.0, shape[0]).to(
                torch.bfloat16)[:, None]
    return w


def _quantize(w: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    amax = w.float().abs().amax() if strategy == "tensor" else w.float().abs().amax(dim=1, keepdim=True)
    scale = (amax / FP8_MAX).to(torch.float32)
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _write_checkpoint(d: Path, shards: list[dict[str, torch.Tensor]], quantization: dict[str, Any] | None) -> Path:
    d.mkdir(parents=True)
    cfg = dict(TINY, torch_dtype="bfloat16")
    if quantization is not None:
        cfg["quantization_config"] = quantization
    (d / "config.json").write_text(json.dumps(cfg))
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(d / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def _fp8_shards(strategy: str, seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Two shards of an FP8 checkpoint (layer 0's weights in the first, their scales in the second, layer 1 the
    other way round), and the dequantized fp32 weights they stand for."""
    first: dict[str, torch.Tensor] = {}
    second: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, w in _random_weights(seed).items():
        prefix = name.removesuffix(".weight")
        if not prefix.endswith(PROJECTIONS):  # embeddings, norms, lm_head stay bf16
            (first if "layers.1." not in name else second)[name] = w
            dequantized[name] = w.float()
            continue
        q, scale = _quantize(w, strategy)
        if strategy == "tensor" and "layers.1." in name:
            scale = scale.reshape(1)  # older checkpoints store per-tensor scales with shape [1], newer as scalars
        layer0 = "layers.0." in name
        (first if layer0 else second)[name] = q
        (second if layer0 else first)[prefix + ".weight_scale"] = scale
        if strategy == "tensor":  # static activations: a calibrated input scale, which the loader drops
            (first if layer0 else second)[prefix + ".input_scale"] = torch.tensor(0.01, dtype=torch.float32)
        dequantized[name] = q.float() * scale
    return [first, second], dequantized


@pytest.fixture(scope="module", params=["tensor", "channel"])
def checkpoints(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[str, Path, Path, dict[str, torch.Tensor]]:
    """(weight strategy, FP8 checkpoint, the same dequantized weights as a plain fp32 checkpoint, those weights)."""
    strategy = request.param
    root = tmp_path_factory.mktemp(f"fp8-{strategy}")
    shards, dequantized = _fp8_shards(strategy)
    fp8 = _write_checkpoint(root / "fp8", shards, _fp8_quantization_config(strategy))
    plain = _write_checkpoint(root / "plain", [dequantized], None)
    return strategy, fp8, plain, dequantized


def _build(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    source = resolve_model(EngineConfig(model=str(path)))
    return build_model(source, ModelArchConfig.from_hf(source.hf_config), dtype, torch.device("cpu"), 64, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_parameters_are_the_dequantized_weights(checkpoints, dtype, caplog):
    strategy, fp8, _, dequantized = checkpoints
    with caplog.at_level(logging.INFO, logger="ember.model.loader"):
        model = _build(fp8, dtype)
    assert f"FP8 checkpoint (compressed-tensors: per-{strategy} weight scales" in caplog.text
    assert f"dequantized to {str(dtype).removeprefix('torch.')}" in caplog.text
    want = {n: t.to(dtype) for n, t in dequantized.items()}
    for i in range(TINY["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        want[pre + "self_attn.qkv_proj.weight"] = torch.cat([want.pop(pre + f"self_attn.{p}_proj.weight")
                                                              for p in "qkv"])
        want[pre + "mlp.gate_up_proj.weight"] = torch.cat([want.pop(pre + f"mlp.{p}_proj.weight")
                                                            for p in ("gate", "up")])
    got = dict(model.named_parameters())
    assert sorted(got) == sorted(want)
    for name, p in got.items():
        assert p.dtype == dtype and torch.equal(p.data, want[name]), name


def test_greedy_tokens_match_the_plain_checkpoint(checkpoints):
    _, fp8, plain, _ = checkpoints
    prompts = [[1, 500, 7000, 42, 9], [3, 1000, 20000, 31000, 17, 17, 4]]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = []
    for path in (fp8, plain):  # "none": on an FP8-capable GPU the default would run FP8 matmuls instead
        llm = LLM(str(path), max_model_len=64, kv_cache_memory_bytes=4 << 20, quantization="none")
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)])
    assert outs[0] == outs[1]
    assert all(len(ids) == 12 for ids in outs[0])


# ------------------------------------------------------------------------------------------------ refused


def _mutated(strategy: str, change: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    q = copy.deepcopy(_fp8_quantization_config(strategy))
    target = q
    for key in path:
        target = target[key]
    target.update(change)
    return q


WEIGHTS = ("config_groups", "group_0", "weights")
INPUTS = ("config_groups", "group_0", "input_activations")
REFUSED = {
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 128}, (), "quant_method 'awq'"),
    "gptq": ({"quant_method": "gptq", "bits": 4}, (), "quant_method 'gptq'"),
    "fp8 (AutoFP8)": ({"quant_method": "fp8", "activation_scheme": "static"}, (), "quant_method 'fp8'"),
    "int8 weights": ({"type": "int"}, WEIGHTS, "8-bit int weights"),
    "int4 packed": ({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}, WEIGHTS,
                    "4-bit int weights"),
    "fp8 block-wise": ({"strategy": "block", "block_structure": [128, 128]}, WEIGHTS, "strategy 'block'"),
    "fp8 per-group": ({"strategy": "group", "group_size": 128}, WEIGHTS, "strategy 'group'"),
    "asymmetric weights": ({"symmetric": False}, WEIGHTS, "asymmetric"),
    "int8 activations": ({"type": "int"}, INPUTS, "input activations 8-bit int"),
    "static per-token activations": ({"strategy": "token", "dynamic": False}, INPUTS, "strategy 'token'"),
    "fp8 kv cache": ({"kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor",
                                          "dynamic": False, "symmetric": True}}, (), "KV cache"),
    "nvfp4": ({"format": "nvfp4-pack-quantized"}, (), "format 'nvfp4-pack-quantized'"),
    "2:4 sparse": ({"sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}}, (),
                   "sparse"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_unsupported_quantization_is_refused_clearly(case):
    change, path, what = REFUSED[case]
    cfg = dict(TINY, quantization_config=_mutated("tensor", change, path))
    with pytest.raises(UnsupportedModelError, match="unsupported quantization") as e:
        ModelArchConfig.from_hf(cfg)
    assert what in str(e.value) and "compressed-tensors" in str(e.value)


@pytest.mark.parametrize("change, path", [
    ({"input_activations": None}, ("config_groups", "group_0")),  # FP8 weights only (W8A16)
    ({"strategy": "tensor", "dynamic": True}, INPUTS),  # dynamic per-tensor activations
    ({"format": "naive-quantized"}, ()),  # the older name of the same storage
])
def test_other_fp8_variants_are_accepted(change, path):
    arch = ModelArchConfig.from_hf(dict(TINY, quantization_config=_mutated("tensor", change, path)))
    assert [s.weight_strategy for s in arch.quantization] == ["tensor"]


def test_refused_before_any_weight_is_read(tmp_path):
    """The engine (LLM, `ember serve`) stops at the config, with the same error."""
    d = _write_checkpoint(tmp_path / "awq", [{}], {"quant_method": "awq", "bits": 4})
    with pytest.raises(UnsupportedModelError, match="quant_method 'awq'"):
        LLM(str(d))


# ------------------------------------------------------------------------------------------------ broken


def test_missing_weight_scale_names_the_tensor(tmp_path):
    shards, _ = _fp8_shards("tensor")
    del shards[0]["model.layers.1.self_attn.k_proj.weight_scale"]  # layer 1's scales sit in the first shard
    d = _write_checkpoint(tmp_path / "fp8", shards, _fp8_quantization_config("tensor"))
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight_scale'"):
        _build(d, torch.float32)


@pytest.mark.parametrize("with_scales", [True, False])
def test_fp8_tensors_without_quantization_config_are_refused(tmp_path, with_scales):
    """Copying FP8 values into the model without their scales would give it wrong weights, silently."""
    shards, _ = _fp8_shards("tensor")
    if not with_scales:
        shards = [{n: t for n, t in s.items() if not n.endswith("_scale")} for s in shards]
    d = _write_checkpoint(tmp_path / "fp8", shards, None)
    what = "a quantization scale" if with_scales else "is float8_e4m3fn"
    with pytest.raises(ValueError, match=f"{what}, but config.json declares no"):
        _build(d, torch.float32)


def test_block_shaped_scale_is_refused(tmp_path):
    shards, _ = _fp8_shards("channel")
    shards[0]["model.layers.1.mlp.up_proj.weight_scale"] = torch.ones(1, 1, 4)  # not [out, 1]
    d = _write_checkpoint(tmp_path / "fp8", shards, _fp8_quantization_config("channel"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: weight_scale of shape"):
        _build(d, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_matmuls_keep_the_checkpoint_fp8_values(checkpoints, dtype):
    """With `--quantization fp8` the projections hold the checkpoint's own FP8 values (not a second rounding of
    the dequantized weights). Per-channel: each row with its checkpoint scale, exactly. Per-tensor: one scale per
    matrix, as vLLM does; a fused q/k/v or gate/up takes the largest of its parts' scales, so the part(s) with
    that scale keep their values exactly and the others are rounded once more to that scale."""
    from ember.model.fp8 import FP8, Fp8Linear

    strategy, fp8_dir, _, _ = checkpoints
    source = resolve_model(EngineConfig(model=str(fp8_dir)))
    model = build_model(source, ModelArchConfig.from_hf(source.hf_config), dtype, torch.device("cpu"), 64, 0,
                        quantization="fp8")
    shards, _ = _fp8_shards(strategy)
    stored = {n: t for shard in shards for n, t in shard.items()}
    for i in range(TINY["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        for fused, parts in (("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                             ("self_attn.o_proj", ("self_attn.o_proj",)),
                             ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
                             ("mlp.down_proj", ("mlp.down_proj",))):
            module = model.get_submodule(pre + fused)
            assert isinstance(module, Fp8Linear)
            want_q = torch.cat([stored[pre + p + ".weight"] for p in parts])
            want_s = torch.cat([stored[pre + p + ".weight_scale"].float().reshape(-1).expand(
                stored[pre + p + ".weight"].shape[0]) for p in parts])
            got_s = module.weight_scale.reshape(-1)
            if strategy == "channel":
                assert module.tensor_scale is None
                assert torch.equal(module.weight.view(torch.uint8), want_q.view(torch.uint8)), pre + fused
                assert torch.equal(got_s, want_s), pre + fused
                continue
            assert module.tensor_scale is not None and torch.equal(got_s, want_s.max().expand_as(got_s))
            same = want_s == want_s.max()
            assert torch.equal(module.weight[same].view(torch.uint8), want_q[same].view(torch.uint8)), pre + fused
            # The rest: the checkpoint's values rounded once to the larger scale (a relative step of 2^-3 at most,
            # plus the smallest subnormal step).
            got = module.weight[~same].float() * got_s[~same, None]
            want = want_q[~same].float() * want_s[~same, None]
            step = torch.finfo(FP8).eps * want.abs() + 2.0 ** -9 * got_s.max()
            assert (got - want).abs().le(step).all(), pre + fused


def test_fp8_checkpoints_default_to_fp8_matmuls_on_fp8_gpus_only(monkeypatch):
    from ember.engine.llm_engine import effective_quantization
    from ember.model import fp8

    plain = ModelArchConfig.from_hf(TINY)
    quantized = ModelArchConfig.from_hf(dict(TINY, quantization_config=_fp8_quantization_config("tensor")))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(fp8, "supported", lambda device: True)  # an sm90 GPU (and the CPU), as far as it asks
    assert effective_quantization(None, quantized, cuda) == "fp8"
    assert effective_quantization(None, quantized, cpu) is None  # dequantized: the CPU's FP8 matmuls are no faster
    assert effective_quantization(None, plain, cuda) is None
    assert effective_quantization("none", quantized, cuda) is None
    assert effective_quantization("fp8", plain, cpu) == "fp8"
    monkeypatch.setattr(fp8, "supported", lambda device: False)  # e.g. an A100: dequantized
    assert effective_quantization(None, quantized, cuda) is None
    # Asked for explicitly there, or an unknown method: refused before any weight is read.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match="needs a Hopper or Blackwell .* cuda is NVIDIA A100"):
        effective_quantization("fp8", plain, cuda)
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        effective_quantization("int4", plain, cpu)


def test_quantization_none_dequantizes_and_records_it(checkpoints):
    from ember.model.fp8 import Fp8Linear

    _, fp8_dir, _, _ = checkpoints
    with LLM(str(fp8_dir), quantization="none", max_model_len=64, kv_cache_memory_bytes=1 << 20) as llm:
        assert llm.engine.loaded.quantization is None
        assert not any(isinstance(m, Fp8Linear) for m in llm.engine.model.modules())
