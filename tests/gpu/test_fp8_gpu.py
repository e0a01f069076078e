"""FP8 matmuls on a Hopper GPU: decode batches through ember's FP8 GEMV give the product of x and the dequantized
weights, larger batches through torch._scaled_mm the product of the dequantized operands, and the engine (CUDA
graphs included) serves with them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ember import LLM, SamplingParams
from ember.model.fp8 import Fp8Linear, dequantized_matmul, quantize_rows, supported, uses_weight_only_kernel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not supported(torch.device("cuda")),
                                reason="needs a GPU with row-wise FP8 matmuls (sm90/sm100)")


def _linear(dtype: torch.dtype, bias: bool, seed: int, n: int = 1536, k: int = 4096) -> nn.Linear:
    g = torch.Generator(device="cpu").manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g) * 0.02)
        if bias:
            linear.bias.copy_(torch.randn(n, generator=g))
    return linear.cuda()


def _rel_err(y: torch.Tensor, want: torch.Tensor) -> float:
    return ((y.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("dtype,m", [(torch.bfloat16, 300), (torch.float16, 300), (torch.float32, 300),
                                     (torch.float32, 1), (torch.bfloat16, 2), (torch.float16, 7),
                                     (torch.bfloat16, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_tensor_core_path_is_the_product_of_the_dequantized_operands(dtype: torch.dtype, m: int,
                                                                          bias: bool) -> None:
    linear = _linear(dtype, bias, m)
    x = torch.randn(m, 4096, generator=torch.Generator(device="cpu").manual_seed(m)).to(dtype).cuda()
    assert not uses_weight_only_kernel(x)
    fp8 = Fp8Linear.from_linear(linear)
    y = fp8(x)
    xq, xs = quantize_rows(x)
    want = (xq.float() * xs) @ (fp8.weight.float() * fp8.weight_scale.t()).t()
    if bias:
        want = want + linear.bias.float()
    assert y.dtype == dtype and y.shape == (m, 1536)
    # Hopper's FP8 tensor cores accumulate with fewer bits than fp32 (~5e-4 relative over K = 4096).
    assert _rel_err(y, want) < (1e-3 if dtype == torch.float32 else 5e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_batch_one_uses_the_gemv_with_an_unquantized_activation(dtype: torch.dtype, bias: bool) -> None:
    linear = _linear(dtype, bias, 1)
    x = torch.randn(1, 4096, generator=torch.Generator(device="cpu").manual_seed(1)).to(dtype).cuda()
    assert uses_weight_only_kernel(x)
    fp8 = Fp8Linear.from_linear(linear)
    want = dequantized_matmul(x.float(), fp8.weight, fp8.weight_scale, linear.bias)
    y = fp8(x.reshape(1, 1, 4096))
    assert y.dtype == dtype and y.shape == (1, 1, 1536)
    assert _rel_err(y.reshape(1, -1), want) < (5e-3 if dtype == torch.bfloat16 else 1e-3)  # the output's rounding


@pytest.mark.parametrize("n,k", [(40, 96), (1000, 14336), (7, 272), (128256, 4096)])
def test_fp8_gemv_edges_of_rows_and_k(n: int, k: int) -> None:
    """Row counts that are not multiples of a block, K not a multiple of BLOCK_K, x a view into a larger batch."""
    from ember.kernels.fp8_gemv import GemvConfig, fp8_gemv

    g = torch.Generator(device="cpu").manual_seed(n + k)
    q, s = quantize_rows(torch.randn(n, k, generator=g).cuda() * 0.05)
    s = s.reshape(-1).contiguous()
    x = torch.randn(2, k, generator=g).to(torch.bfloat16).cuda()[1:]
    want = dequantized_matmul(x.float(), q, s)
    for cfg in (None, GemvConfig(1, 64, 4), GemvConfig(8, 1024, 2, 6)):
        y = fp8_gemv(x, q, s, config=cfg)
        assert y.shape == (1, n) and torch.isfinite(y).all()
        assert _rel_err(y, want) < 5e-3, cfg  # bf16 output rounding


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_engine_serves_with_fp8_matmuls(enforce_eager: bool) -> None:
    """The embedded model (real weights) with FP8 projections, eager and with captured decode graphs."""
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    llm = LLM(quantization="fp8", enforce_eager=enforce_eager, max_model_len=512, kv_cache_memory_bytes=64 << 20)
    assert llm.engine.cuda_graphs_enabled is not enforce_eager
    out = llm.chat([msgs] * 3, sampling_params=SamplingParams(temperature=0, max_tokens=16))
    texts = [o.outputs[0].text for o in out]
    assert len(set(texts)) == 1 and "Paris" in texts[0]
