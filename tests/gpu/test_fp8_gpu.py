"""FP8 matmuls on a Hopper GPU: torch._scaled_mm with row-wise scales computes the product of the dequantized
operands for every batch size the engine uses, and the engine (CUDA graphs included) serves with them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ember import LLM, SamplingParams
from ember.model.fp8 import Fp8Linear, quantize_rows, supported

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not supported(torch.device("cuda")),
                                reason="needs a GPU with row-wise FP8 matmuls (sm90/sm100)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 7, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_is_the_product_of_the_dequantized_operands(dtype: torch.dtype, m: int, bias: bool) -> None:
    g = torch.Generator(device="cpu").manual_seed(m)
    linear = nn.Linear(4096, 1536, bias=bias).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(1536, 4096, generator=g) * 0.02)
        if bias:
            linear.bias.copy_(torch.randn(1536, generator=g))
    linear = linear.cuda()
    x = torch.randn(m, 4096, generator=g).to(dtype).cuda()
    fp8 = Fp8Linear.from_linear(linear)
    y = fp8(x)
    xq, xs = quantize_rows(x)
    want = (xq.float() * xs) @ (fp8.weight.float() * fp8.weight_scale.t()).t()
    if bias:
        want = want + linear.bias.float()
    assert y.dtype == dtype and y.shape == (m, 1536)
    err = ((y.float() - want).norm() / want.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 5e-3)


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_engine_serves_with_fp8_matmuls(enforce_eager: bool) -> None:
    """The embedded model (real weights) with FP8 projections, eager and with captured decode graphs."""
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    llm = LLM(quantization="fp8", enforce_eager=enforce_eager, max_model_len=512, kv_cache_memory_bytes=64 << 20)
    assert llm.engine.cuda_graphs_enabled is not enforce_eager
    out = llm.chat([msgs] * 3, sampling_params=SamplingParams(temperature=0, max_tokens=16))
    texts = [o.outputs[0].text for o in out]
    assert len(set(texts)) == 1 and "Paris" in texts[0]
