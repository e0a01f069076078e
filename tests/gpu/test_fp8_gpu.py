"""FP8 matmuls on a Hopper GPU: batch 1 through ember's FP8 GEMV, decode batches through cuBLASLt's tensor-wise
kernel (token scales applied to its output rows) and the rest through its row-wise one each compute the product
of their dequantized operands, and the engine (CUDA graphs included) serves with them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ember import LLM, SamplingParams
from ember.model.fp8 import Fp8Linear, dequantized_matmul, quantize_rows, supported

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


@pytest.mark.parametrize("dtype,m,per_tensor,kernel", [
    (torch.bfloat16, 300, True, "rowwise"), (torch.float16, 300, False, "rowwise"),
    (torch.float32, 300, True, "rowwise"), (torch.float32, 1, True, "rowwise"), (torch.float32, 7, True, "rowwise"),
    (torch.bfloat16, 65, True, "rowwise"), (torch.bfloat16, 7, False, "rowwise"),
    (torch.bfloat16, 2, True, "tensorwise"), (torch.bfloat16, 7, True, "tensorwise"),
    (torch.bfloat16, 64, True, "tensorwise"), (torch.float16, 7, True, "rowwise"),
    (torch.bfloat16, 1, True, "gemv"), (torch.float16, 1, False, "gemv"),
])
@pytest.mark.parametrize("bias", [False, True])
def test_each_fp8_kernel_computes_its_reference(dtype: torch.dtype, m: int, per_tensor: bool, kernel: str,
                                                bias: bool) -> None:
    """Row- and tensor-wise: the product of the per-token activations and the weights, dequantized; the GEMV: of
    the unquantized activation and the weights."""
    linear = _linear(dtype, bias, m)
    x = torch.randn(m, 4096, generator=torch.Generator(device="cpu").manual_seed(m)).to(dtype).cuda()
    fp8 = Fp8Linear.from_linear(linear, per_tensor=per_tensor)
    assert fp8.kernel(x) == kernel
    w = fp8.weight.float() * fp8.weight_scale.t()
    if kernel == "gemv":
        want = x.float() @ w.t()
    else:
        xq, xs = quantize_rows(x)
        want = (xq.float() * xs) @ w.t()
    if bias:
        want = want + linear.bias.float()
    y = fp8(x.reshape(m, 1, 4096))
    assert y.dtype == dtype and y.shape == (m, 1, 1536)
    # Hopper's FP8 tensor cores accumulate with fewer bits than fp32 (~5e-4 relative over K = 4096); bf16 and
    # fp16 outputs add their rounding.
    assert _rel_err(y.reshape(m, -1), want) < (1e-3 if dtype == torch.float32 else 5e-3)


@pytest.mark.parametrize("per_tensor", [True, False])
def test_a_rows_result_does_not_depend_on_the_other_rows(per_tensor: bool) -> None:
    """Activations are quantized per token on every path: a row next to a 1000x larger one (a prompt's first
    token, a graph's padding) gives what it gives next to an ordinary one."""
    linear = _linear(torch.bfloat16, False, 3)
    fp8 = Fp8Linear.from_linear(linear, per_tensor=per_tensor)
    g = torch.Generator(device="cpu").manual_seed(3)
    rows = torch.randn(3, 4096, generator=g).to(torch.bfloat16).cuda()
    outlier = rows.clone()
    outlier[1] *= 1000
    assert fp8.kernel(rows) == ("tensorwise" if per_tensor else "rowwise")
    a, b = fp8(rows), fp8(outlier)
    assert _rel_err(b[0], a[0]) < 1e-3 and _rel_err(b[2], a[2]) < 1e-3


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
