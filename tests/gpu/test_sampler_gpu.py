"""The sampler's two-pass argmax on CUDA: the same index as torch's argmax (ties, NaN, -inf rows)."""

from __future__ import annotations

import pytest
import torch

from ember.sampling.sampler import argmax_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("rows", [1, 5, 63, 64])
@pytest.mark.parametrize("vocab", [128256, 151936, 49152, 32000])
def test_argmax_rows_matches_argmax_on_cuda(rows: int, vocab: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(rows * vocab)
    x = torch.randn(rows, vocab, device="cuda", generator=g)
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    x = torch.randint(0, 4, (rows, vocab), device="cuda", generator=g).float()
    x[:, vocab - 1] = 9.0
    x[:, vocab // 3] = 9.0
    x[:, vocab // 3 + 1] = 9.0
    got = argmax_rows(x)
    assert torch.equal(got, x.argmax(-1)) and (got == vocab // 3).all()
    x[0, vocab - 2] = float("nan")
    x[-1] = float("-inf")
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    half = x.to(torch.bfloat16)
    assert torch.equal(argmax_rows(half), half.argmax(-1))
