"""FP8 matmuls (`--quantization fp8`): per-token activations times per-channel weights through torch._scaled_mm
compute exactly the product of the dequantized operands; the engine converts every projection and still answers
sensibly with the embedded model's real weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ember import LLM, SamplingParams
from ember.cli import build_parser, engine_config_from_args
from ember.model.fp8 import FP8, FP8_MAX, Fp8Linear, convert_to_fp8, quantize_rows
from ember.model.linear import rms_normalise


def test_quantize_rows_is_within_half_a_step_and_keeps_zero_rows_finite() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 256, generator=g) * torch.logspace(-4, 3, 6)[:, None]
    x[2] = 0
    q, scale = quantize_rows(x)
    assert q.dtype == FP8 and scale.shape == (6, 1) and torch.isfinite(scale).all()
    assert torch.equal(q.float().abs().amax(dim=1)[[0, 1, 3, 4, 5]], torch.full((5,), FP8_MAX))
    err = (q.float() * scale - x).abs()
    # e4m3 keeps 3 mantissa bits: rounding moves a value by at most 1/16 of it, below the smallest normal
    # (2^-6 of the scale) by at most half of the subnormal step 2^-9.
    assert (err <= x.abs() / 16 + scale * 2 ** -10).all()
    assert not q[2].float().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_is_the_product_of_the_dequantized_operands(dtype: torch.dtype, bias: bool) -> None:
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(128, 48, bias=bias).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 128, generator=g) * torch.linspace(0.01, 1, 48)[:, None])
        if bias:
            linear.bias.copy_(torch.randn(48, generator=g))
    x = (torch.randn(3, 5, 128, generator=g) * 3).to(dtype)
    fp8 = Fp8Linear.from_linear(linear)
    assert fp8.weight.dtype == FP8 and fp8.weight_scale.shape == (1, 48)
    y = fp8(x)
    assert y.shape == (3, 5, 48) and y.dtype == dtype
    xq, xs = quantize_rows(x.reshape(-1, 128))
    want = (xq.float() * xs) @ (fp8.weight.float() * fp8.weight_scale.t()).t()
    if bias:
        want = want + linear.bias.float()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(y.reshape(-1, 48).float(), want, rtol=tol, atol=tol * want.abs().max().item())
    # And near the unquantized product: FP8 operands cost a few percent.
    exact = linear(x).float()
    assert ((y.float() - exact).norm() / exact.norm()).item() < 0.08


def test_weights_are_per_tensor_by_default_and_per_row_on_request() -> None:
    g = torch.Generator().manual_seed(2)
    linear = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 64, generator=g) * torch.logspace(-2, 0, 32)[:, None])
    per_tensor = Fp8Linear.from_linear(linear)
    per_row = Fp8Linear.from_linear(linear, per_tensor=False)
    top = linear.weight.abs().max() / FP8_MAX
    assert per_tensor.tensor_scale is not None and torch.allclose(per_tensor.tensor_scale, top)
    assert torch.equal(per_tensor.weight_scale, per_tensor.tensor_scale.expand(1, 32))
    assert per_row.tensor_scale is None
    assert torch.allclose(per_row.weight_scale.reshape(-1), linear.weight.abs().amax(dim=1) / FP8_MAX)
    # A checkpoint's per-row scales become their largest when per-tensor weights are asked for.
    scales = torch.linspace(0.5, 2.0, 32)
    assert torch.equal(Fp8Linear.from_linear(linear, scales).weight_scale.reshape(-1), torch.full((32,), 2.0))
    x = torch.randn(4, 64)
    exact = linear(x)
    for m in (per_tensor, per_row):
        assert ((m(x) - exact).norm() / exact.norm()).item() < 0.08


def test_only_projections_with_widths_in_multiples_of_16_are_converted() -> None:
    llm = LLM(max_model_len=128, kv_cache_memory_bytes=4 << 20)  # the embedded SmolLM2: 30 layers
    model = llm.engine.model
    model.model.layers[1].mlp.down_proj = nn.Linear(1530, 576, bias=False)  # a width cuBLASLt's FP8 path refuses
    assert convert_to_fp8(model) == 4 * 30 - 1
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.Linear)
    assert isinstance(model.model.layers[1].mlp.gate_up_proj, Fp8Linear)


def test_engine_with_fp8_matmuls_answers_like_the_full_precision_one() -> None:
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    llm = LLM(quantization="fp8", max_model_len=256, kv_cache_memory_bytes=8 << 20)
    layer = llm.engine.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Fp8Linear) and isinstance(layer.mlp.down_proj, Fp8Linear)
    out = llm.chat(msgs, sampling_params=SamplingParams(temperature=0, max_tokens=16))
    assert out[0].outputs[0].text == "The capital of France is Paris."


def test_cli_flag_and_unknown_methods() -> None:
    args = build_parser().parse_args(["serve", "--quantization", "fp8"])
    assert engine_config_from_args(args).quantization == "fp8"
    assert build_parser().parse_args(["serve", "-q", "none"]).quantization == "none"
    assert build_parser().parse_args(["serve"]).quantization is None  # chosen from the checkpoint and the GPU
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantization", "awq"])
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        LLM(quantization="int4", max_model_len=64, kv_cache_memory_bytes=1 << 20)


def test_roofline_reads_the_weights_as_stored() -> None:
    """The HBM roofline of `ember bench latency` counts FP8 projections at one byte a value."""
    from ember.bench.roofline import model_weight_bytes, weight_bytes_per_step

    full = LLM(max_model_len=64, kv_cache_memory_bytes=1 << 20).engine  # fp32 on the CPU, tied embeddings
    assert model_weight_bytes(full.model) == weight_bytes_per_step(full.arch, full.dtype)
    fp8 = LLM(quantization="fp8", max_model_len=64, kv_cache_memory_bytes=1 << 20).engine
    projections = sum(m.weight.numel() for layer in fp8.model.model.layers
                      for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                                layer.mlp.down_proj))
    scales = sum(m.weight_scale.numel() for layer in fp8.model.model.layers
                 for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                           layer.mlp.down_proj))
    assert model_weight_bytes(fp8.model) == model_weight_bytes(full.model) - 3 * projections + 4 * scales
    # `ember bench serve --roofline-quantization fp8` counts the same bytes from the config alone (scales aside).
    assert weight_bytes_per_step(fp8.arch, fp8.dtype, "fp8") == model_weight_bytes(fp8.model) - 4 * scales


def test_a_shared_model_must_match_the_engines_quantization() -> None:
    from ember.config import EngineConfig
    from ember.engine.llm_engine import LLMEngine

    base = LLM(max_model_len=64, kv_cache_memory_bytes=1 << 20).engine
    with pytest.raises(ValueError, match="loaded with quantization None"):
        LLMEngine(EngineConfig(quantization="fp8", max_model_len=64, kv_cache_memory_bytes=1 << 20), base.loaded)
    # The default (None) takes the shared model as it was loaded; "none" is what it was loaded with.
    for q in (None, "none"):
        LLMEngine(EngineConfig(quantization=q, max_model_len=64, kv_cache_memory_bytes=1 << 20), base.loaded)



def test_fp8_rooflines_put_only_the_projections_at_the_fp8_rate() -> None:
    from ember.bench.roofline import Roofline, matmul_flops_per_token, projection_params
    from ember.config import EngineConfig
    from ember.model.config import ModelArchConfig
    from ember.model.loader import resolve_model

    arch = ModelArchConfig.from_hf(resolve_model(EngineConfig(model="llama-3.1-8b-instruct",
                                                              load_format="dummy")).hf_config)
    bf16 = Roofline(bandwidth=1e30, matmul_rate=1e15)
    fp8 = Roofline(bandwidth=1e30, matmul_rate=1e15, fp8_matmul_rate=2e15)
    tokens, attn = 1000, 3e12
    flops = matmul_flops_per_token(arch) * tokens + attn
    proj = 2 * projection_params(arch) * tokens
    assert bf16.step_time(arch, torch.bfloat16, tokens, 0, attn) == pytest.approx(flops / 1e15)
    assert fp8.step_time(arch, torch.bfloat16, tokens, 0, attn) == pytest.approx(proj / 2e15 + (flops - proj) / 1e15)
    # The lm_head and attention are what stay at the bf16 rate: 8B's lm_head is ~7 % of a token's matmul FLOPs.
    assert 0.05 < (flops - attn - proj) / (flops - attn) < 0.09
    assert set(fp8.rates()) == {"bandwidth_gb_s", "matmul_tflop_s", "fp8_matmul_tflop_s"}
    assert "fp8_matmul_tflop_s" not in bf16.rates()


def test_fp8_linear_takes_linears_norm_and_residual_keywords() -> None:
    g = torch.Generator().manual_seed(3)
    linear = nn.Linear(64, 32, bias=True).to(torch.bfloat16)
    fp8 = Fp8Linear.from_linear(linear)
    x = (torch.randn(4, 64, generator=g) * 5).to(torch.bfloat16)
    residual = torch.randn(4, 32, generator=g).to(torch.bfloat16)
    eps = 1e-5
    expected = fp8(rms_normalise(x, eps)) + residual
    assert torch.equal(fp8(x, rms_eps=eps, residual=residual), expected)
    assert torch.equal(fp8(x, residual=residual), fp8(x) + residual)
    assert not torch.equal(fp8(x, rms_eps=eps), fp8(x))
