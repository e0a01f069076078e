"""The projections' Linear: `nn.Linear`, whose one-row products on a Hopper-or-later GPU go through ember's GEMV."""

from __future__ import annotations

import os
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn


# The multi-row CUDA forward adds each residual in the product before the next RMSNorm instead of in that norm's
# kernel (`LlamaDecoderLayer.forward_residual_in_products`; offline 0.8 % faster on an H100, fifteenth session).
# `EMBER_RESIDUAL_IN_PRODUCTS=0`: the add + RMSNorm kernel does it, the baseline when measuring this; `=N` (N > 1):
# only steps of at least N tokens add it in the products, to measure small steps apart on a card (on an H100 it was
# within 1.5 % of the fused norm from 64 to 1,024 rows: eighteenth session).
def residual_in_products_setting(value: str) -> tuple[bool, int]:
    """`EMBER_RESIDUAL_IN_PRODUCTS` as (on, the fewest tokens of a step that takes it)."""
    if not value.strip().isdigit():
        raise ValueError(f"EMBER_RESIDUAL_IN_PRODUCTS must be 0, 1 or a token count, not {value!r}")
    return int(value) != 0, max(2, int(value))


RESIDUAL_IN_PRODUCTS, RESIDUAL_IN_PRODUCTS_MIN_TOKENS = residual_in_products_setting(
    os.environ.get("EMBER_RESIDUAL_IN_PRODUCTS", "1"))


class Linear(nn.Linear):
    """A batch-1 decode step's products through `ember.kernels.gemv` (it starts reading its weight while the
    short kernels ahead of it run); every other product through `F.linear`. `after_attention`: the product
    that follows attention, whose longer gap allows a longer prefetch."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: torch.device | None = None,
                 dtype: torch.dtype | None = None, *, after_attention: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.after_attention = after_attention

    def gemv_kernels(self, x: torch.Tensor) -> ModuleType | None:
        """`ember.kernels.gemv` where it serves this product of `x`, else None (imported for one-row CUDA inputs
        only: the CPU path never loads the kernels)."""
        if not (x.is_cuda and x.dim() == 2 and x.shape[0] == 1):
            return None
        from ember.kernels import gemv

        return gemv if gemv.applies(x, self.weight) else None

    def forward(self, x: torch.Tensor, *, rms_eps: float | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """With `rms_eps`, x is RMS-normalised first (an RMSNorm whose weight was folded into this one's, see
        `LlamaForCausalLM.fold_norms`); `residual` is added to the result. Both run inside the GEMV; on a GPU the
        residual is also added inside cuBLAS's product, into `residual` itself (the caller must not reuse it)."""
        gemv = self.gemv_kernels(x)
        if gemv is not None:
            return gemv.gemv(x, self.weight, self.bias, rms_eps=rms_eps, residual=residual,
                             after_attention=self.after_attention)
        if (residual is not None and x.is_cuda and rms_eps is None and self.bias is None and x.dim() == 2
                and residual.shape == (x.shape[0], self.out_features) and residual.dtype == x.dtype
                and residual.is_contiguous()):
            # cuBLAS adds the residual in the product's epilogue (beta = 1), in place: an out-of-place addmm
            # would first copy the residual into its output, the very pass this saves. The caller hands
            # `residual` over. (On an H100 the tokens and logprobs came out the same as with the separate add.)
            return residual.addmm_(x, self.weight.t())
        return linear_ref(x, self.weight, self.bias, rms_eps=rms_eps, residual=residual)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               rms_eps: float | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """`Linear.forward` without the GEMV, and the GEMV's torch twin (the same function, rounded differently: the
    GEMV scales its fp32 sums and rounds once): `F.linear` of x RMS-normalised (in fp32, rounded to x's dtype as
    RMSNorm rounds before its weight) where `rms_eps` is given, plus `residual`."""
    if rms_eps is not None:
        x = rms_normalise(x, rms_eps)
    y = F.linear(x, weight, bias)
    return y if residual is None else y + residual


def rms_normalise(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x over its root mean square, weightless: in fp32 like the reference implementation, then cast back (an
    RMSNorm multiplies its weight in after that cast, `ember.model.layers.rms_norm_ref`)."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
