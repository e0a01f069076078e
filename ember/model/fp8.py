"""FP8 matmuls: weights stored as float8_e4m3fn, activations quantized per token at run time.

A decode step reads every weight once: FP8 halves those bytes, the bulk of a small batch's step. Weights are
quantized at load from the model's values: a bf16 checkpoint's with one scale per matrix (its absolute maximum,
as vLLM's `--quantization fp8` does), an FP8 checkpoint's with its own scales (per channel: kept row by row,
exactly; per tensor: one per matrix, a fused q/k/v or gate/up taking the largest of its parts'). Embeddings and
the lm_head stay in the model's dtype.

Three products (`Fp8Linear.kernel`): batch-1 decode on a GPU keeps its 16-bit activation and goes through ember's
FP8 GEMV (`ember/kernels/fp8_gemv.py`); up to 64 bf16 rows with per-tensor weights go through cuBLASLt's tensor-wise
FP8 kernel, about twice as fast as its row-wise one at those sizes, each token's scale applied to its output row
afterwards; larger batches and per-channel weights through the row-wise kernel (`torch._scaled_mm` with a scale
per token and per weight row). CPUs multiply the FP8 operands in fp32, then apply both scales. A batch-wide
activation scale would save that row scaling, but would let one row's outliers (a prompt's first token, a CUDA
graph's padding rows) coarsen every other row's quantization.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.model.linear import rms_normalise

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
# An all-zero row would get a zero scale and divide by it.
MIN_SCALE = 1e-12
# Up to this many rows (decode batches) cuBLASLt's tensor-wise FP8 kernels read the weights about twice as fast
# as its row-wise ones on an H200 (bench/fp8_gemv.py); larger batches are compute-bound.
TENSORWISE_MAX_ROWS = 64


def quantize_rows(x: torch.Tensor, scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of `x` [M, K] as FP8 with its own fp32 scale [M, 1] (`scales`, or the row's absolute maximum
    over FP8_MAX): x ~= q * scale."""
    xf = x.float()
    if scales is None:
        scale = xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX
    else:
        scale = scales.to(xf.device, torch.float32).reshape(-1, 1)
    scale = scale.clamp(min=MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def supported(device: torch.device) -> bool:
    """Row-wise scaled FP8 matmuls: Hopper and Blackwell data-center GPUs (sm90, sm100), or the CPU. (cuBLASLt
    refuses row-wise scaling on consumer Blackwell, sm120: pytorch issue 192707.)"""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in (9, 10)


class Fp8Linear(nn.Module):
    """y = x @ W.T (+ bias) with W in FP8: [out, in] row-major, which `_scaled_mm` takes transposed (column-major)
    as its second operand. `weight_scale` holds one scale per output row; when they are all one value (per-tensor
    weights) `tensor_scale` holds it, and decode batches can use the tensor-wise kernels."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(weight_scale.reshape(1, -1).contiguous(), requires_grad=False)  # [1, out]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        first = self.weight_scale.reshape(-1)[:1]
        uniform = bool((self.weight_scale == first).all())
        self.tensor_scale = nn.Buffer(first.reshape(()).clone()) if uniform else None
        # The other operand's scale where a product's scales are applied apart (tensor-wise, CPU).
        self.unit_scale = nn.Buffer(torch.ones((), device=weight.device), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, row_scales: torch.Tensor | None = None,
                    per_tensor: bool = True) -> Fp8Linear:
        """FP8 weights with one scale for the matrix (`per_tensor`, from its absolute maximum or the largest of
        `row_scales`) or one a row (from each row's absolute maximum, or `row_scales`: an FP8 checkpoint's)."""
        w = linear.weight.data
        if per_tensor:
            top = w.float().abs().amax() / FP8_MAX if row_scales is None else row_scales.float().max()
            row_scales = top.reshape(1).expand(w.shape[0])
        q, scale = quantize_rows(w, row_scales)
        return cls(q, scale, None if linear.bias is None else linear.bias.data)

    def kernel(self, x: torch.Tensor) -> str:
        """Which product serves activations `x` [M, K]: "gemv" (one 16-bit row, left unquantized, on a GPU),
        "tensorwise" (up to 64 bf16 rows on a GPU with per-tensor weights: cuBLASLt's tensor-wise kernel, the
        token scales applied to its output rows), "rowwise" (cuBLASLt's row-wise kernel: larger batches, fp16,
        per-channel weights) or "cpu" (the FP8 operands multiplied in fp32, then both scales). All but the GEMV
        quantize the activations per token."""
        if not x.is_cuda:
            return "cpu"
        if x.dtype not in (torch.bfloat16, torch.float16):
            return "rowwise"
        if x.shape[0] == 1:
            return "gemv"
        # fp16 is left out: the tensor-wise product is rounded before the token scales multiply it, and |y| /
        # token scale can pass fp16's 65504 where y itself does not.
        small = x.shape[0] <= TENSORWISE_MAX_ROWS and x.dtype == torch.bfloat16
        return "tensorwise" if self.tensor_scale is not None and small else "rowwise"

    def forward(self, x: torch.Tensor, *, rms_eps: float | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """`rms_eps` and `residual` as `Linear.forward` takes them, applied around the FP8 product (which fuses
        neither), so that a layer calls either kind of projection the same way. (Norms are folded into 16-bit
        weights only: a model's FP8 projections get no `rms_eps` from it.)"""
        if rms_eps is not None:
            x = rms_normalise(x, rms_eps)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        kernel = self.kernel(x2)
        if kernel == "gemv":
            from ember.kernels.fp8_gemv import fp8_gemv

            y = fp8_gemv(x2.contiguous(), self.weight, self.weight_scale.view(-1), self.bias)
        else:
            xq, x_scale = quantize_activations(x2)
            if kernel == "tensorwise":
                # One scale per operand picks cuBLASLt's small-batch kernels; each token's own scale then
                # multiplies its output row (in place: the same launch count as a batch-wide scale would need,
                # and a row's result does not depend on the other rows of the batch).
                y = torch._scaled_mm(xq, self.weight.t(), scale_a=self.unit_scale, scale_b=self.tensor_scale,
                                     out_dtype=x.dtype)
                y.mul_(x_scale)
            elif kernel == "cpu":
                # FP8 values are exact in fp32, so this is the FP8 product with fp32 accumulation; the CPU
                # build's `_scaled_mm` computes the same about 70x slower (a naive loop).
                y = xq.float() @ self.weight.float().t()
                y = (y * x_scale * self.weight_scale).to(x.dtype)
            else:
                y = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale,
                                     out_dtype=x.dtype)
            if self.bias is not None:
                y = y + self.bias
        y = y.reshape(*shape[:-1], self.out_features)
        return y if residual is None else y + residual


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 activations: one Triton kernel on CUDA, `quantize_rows` elsewhere."""
    if x.is_cuda:
        from ember.kernels.fp8_quant import quantize_rows_fp8

        return quantize_rows_fp8(x)
    return quantize_rows(x)


def dequantized_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ (weight * scale).T (+ bias)` computed in fp32 and returned in x's dtype: the torch twin of the FP8
    GEMV (`scale`: one value per row of `weight`, or one for all)."""
    y = x.float() @ (weight.float() * scale.reshape(-1, 1).float()).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def can_convert(linear: nn.Linear) -> bool:
    # cuBLASLt's FP8 products need both the reduction and the output width in multiples of 16.
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def convert_to_fp8(model: nn.Module, row_scales: dict[str, torch.Tensor] | None = None,
                   per_tensor: bool = True) -> int:
    """Replace the q/k/v, o, gate/up and down projections by FP8 ones quantized from their current weights (with
    `row_scales[param name]`, an FP8 checkpoint's scales per row, where given), one scale per matrix
    (`per_tensor`) or per row; returns how many were converted (a projection whose widths are not multiples of
    16 stays as it is)."""
    row_scales = row_scales or {}
    converted = 0
    for i, layer in enumerate(model.model.layers):  # type: ignore[union-attr]
        for parent, path, name in ((layer.self_attn, "self_attn", "qkv_proj"), (layer.self_attn, "self_attn", "o_proj"),
                                   (layer.mlp, "mlp", "gate_up_proj"), (layer.mlp, "mlp", "down_proj")):
            linear = getattr(parent, name)
            if isinstance(linear, nn.Linear) and can_convert(linear):
                scales = row_scales.get(f"model.layers.{i}.{path}.{name}.weight")
                setattr(parent, name, Fp8Linear.from_linear(linear, scales, per_tensor))
                converted += 1
    return converted
