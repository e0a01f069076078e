"""The gate/up product with SiLU·mul in its epilogue (`ember/kernels/gate_up_silu.py`) against its torch twin:
row counts off the tile, inter not a multiple of the tile, K not a multiple of BLOCK_K; and `GatedMLP` takes it
for enough rows when it is on. On the CPU the small cases run through Triton's interpreter
(tests/attention/test_kernels_interpreted.py), in fp32."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from ember.kernels import gate_up_silu as mod
from ember.model.layers import GatedMLP, silu_mul_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA (or TRITON_INTERPRET=1)")
DTYPES = [torch.float32] if DEVICE == "cpu" else [torch.bfloat16, torch.float16]
# Small tiles under the interpreter; the default launch shape on a GPU.
CONFIG = (16, 16, 32, 1, 1) if DEVICE == "cpu" else mod.CONFIG


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter,hidden", [(1, 48, 64), (37, 40, 96), (130, 16, 200), (300, 96, 64)]
                         + ([] if DEVICE == "cpu" else [(4100, 14336, 4096), (777, 1000, 4096)]))
def test_gate_up_silu_matches_the_unfused_product(dtype: torch.dtype, rows: int, inter: int, hidden: int) -> None:
    g = torch.Generator(device="cpu").manual_seed(rows + inter + hidden)
    x = torch.randn(rows, hidden, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(2 * inter, hidden, generator=g) / hidden ** 0.5).to(dtype).to(DEVICE)
    got = mod.gate_up_silu(x, w, CONFIG)
    ref = silu_mul_ref(F.linear(x, w))
    assert got.shape == (rows, inter) and torch.isfinite(got).all()  # every tile written
    # Both accumulate in fp32; they differ only in the order of the sums and one rounding of each half.
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2 if dtype != torch.float32 else 1e-5,
                               rtol=2e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.skipif(DEVICE == "cpu", reason="GatedMLP sends CUDA tensors only to the kernel")
def test_gated_mlp_takes_the_kernel_for_enough_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    mlp = GatedMLP(256, 384).to(DEVICE, torch.bfloat16)
    x = torch.randn(64, 256, device=DEVICE, dtype=torch.bfloat16)
    ref = mlp(x)
    calls = []
    real = mod.gate_up_silu
    monkeypatch.setattr(mod, "ENABLED", True)
    monkeypatch.setattr(mod, "MIN_ROWS", 64)
    monkeypatch.setattr(mod, "gate_up_silu", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = mlp(x)
    assert len(calls) == 1
    mlp(x[:63])  # fewer rows than MIN_ROWS stay with cuBLAS
    assert len(calls) == 1
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
