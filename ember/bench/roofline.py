"""The two ceilings a step cannot beat: bytes over memory bandwidth, FLOPs over the matmul rate.

Both rates are measured on the device in the same run as the benchmark (datasheet numbers are only leads).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ember.engine.kv_cache import bytes_per_block
from ember.model.config import ModelArchConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, reps: int) -> float:
    """Median seconds of `fn` over `reps` runs after a warm-up (device events on CUDA)."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a large device copy, counting bytes read plus bytes written."""
    if device.type != "cuda":
        nbytes = 1 << 28
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), device, 10)


def _square_matmul(device: torch.device, dtype: torch.dtype, n: int, fp8: bool) -> Callable[[], object]:
    """One n x n x n product on random data (`fp8`: of FP8 operands, as `--quantization fp8` runs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    if not fp8:
        return lambda: a @ b
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones((), device=device)
    return lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=dtype)


def measure_matmul(device: torch.device, dtype: torch.dtype, n: int = 8192, fp8: bool = False) -> float:
    """FLOP/s of a large square matmul on random data (`fp8`: of FP8 operands, as `--quantization fp8` runs)."""
    if device.type != "cuda":
        n = 1024
    return 2 * n ** 3 / median_seconds(_square_matmul(device, dtype, n, fp8), device, 10)


def measure_matmul_sustained(device: torch.device, dtype: torch.dtype, seconds: float = 5.0, n: int = 8192,
                             fp8: bool = False) -> float:
    """FLOP/s of back-to-back square matmuls after `seconds` of them: the rate the card holds under a long
    compute-bound load. `measure_matmul` times a few milliseconds at boost clock; a large GPU at full load soon
    reaches its power cap and lowers its clock (an H200: 1,980 MHz and ~790 TFLOP/s for a burst, ~1,470 MHz
    and ~670 TFLOP/s after a second of matmuls), and an offline benchmark runs for tens of seconds there."""
    if device.type != "cuda":
        return measure_matmul(device, dtype, fp8=fp8)
    mm = _square_matmul(device, dtype, n, fp8)
    # ~0.1 s queued ahead keeps the GPU busy between host checks.
    batch = max(1, int(0.1 / median_seconds(mm, device, 3)))
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(batch):
            mm()
        _sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(2 * batch):
        mm()
    end.record()
    end.synchronize()
    return 2 * n ** 3 * 2 * batch / (start.elapsed_time(end) / 1e3)


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a forward reads, as stored (FP8 projections count one byte a value); the embedding
    table is read only for the rows used, so it counts only when it is also the lm_head."""
    tied = model.config.tie_word_embeddings  # type: ignore[union-attr]
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()  # tied tensors once
               if tied or name != "model.embed_tokens.weight")


def projection_shapes(arch: ModelArchConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each layer's fused projections."""
    h, i = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    return {"qkv_proj": (q + 2 * kv, h), "o_proj": (h, q), "gate_up_proj": (2 * i, h), "down_proj": (h, i)}


def param_count(arch: ModelArchConfig) -> int:
    h, v = arch.hidden_size, arch.vocab_size
    per_layer = sum(n * k for n, k in projection_shapes(arch).values()) + 2 * h  # and two norms
    head = 0 if arch.tie_word_embeddings else v * h
    return arch.num_hidden_layers * per_layer + v * h + head + h


def projection_params(arch: ModelArchConfig) -> int:
    """Weights of the q/k/v, o, gate/up and down projections of all layers that `--quantization fp8` stores in
    FP8 (those whose widths are multiples of 16: `ember.model.fp8.can_convert`)."""
    shapes = projection_shapes(arch).values()
    return arch.num_hidden_layers * sum(n * k for n, k in shapes if n % 16 == 0 and k % 16 == 0)


def weight_bytes_per_step(arch: ModelArchConfig, dtype: torch.dtype, quantization: str | None = None) -> int:
    """Every weight is read once per forward; the embedding table only for the rows used (negligible). With
    `quantization="fp8"` the projections count one byte a value (their scales, a few per matrix, left out)."""
    elem = torch.empty((), dtype=dtype).element_size()
    embed = 0 if arch.tie_word_embeddings else arch.vocab_size * arch.hidden_size
    total = (param_count(arch) - embed) * elem
    if quantization == "fp8":
        total -= projection_params(arch) * (elem - 1)
    return total


def kv_bytes_per_token(arch: ModelArchConfig, dtype: torch.dtype) -> int:
    return bytes_per_block(arch, 1, dtype)


def matmul_flops_per_token(arch: ModelArchConfig) -> int:
    """2 x parameters of the linear layers (embedding lookup excluded, lm_head included)."""
    return 2 * (param_count(arch) - arch.vocab_size * arch.hidden_size * (0 if arch.tie_word_embeddings else 1)
                - arch.hidden_size * (2 * arch.num_hidden_layers + 1))


def attention_flops(arch: ModelArchConfig, q_tokens: int, context: float) -> float:
    """QK^T and PV: 4 x heads x head_dim per (query, key) pair."""
    return 4 * arch.num_hidden_layers * arch.num_attention_heads * arch.head_dim * q_tokens * context


@dataclass
class Roofline:
    bandwidth: float  # bytes/s
    matmul_rate: float  # FLOP/s of matmuls in the model's dtype
    fp8_matmul_rate: float | None = None  # FLOP/s of FP8 ones: set when the projections run in FP8

    def compute_time(self, arch: ModelArchConfig, flops: float, projection_tokens: float) -> float:
        """Seconds for `flops`, of which the projections of `projection_tokens` tokens go at the FP8 rate when
        there is one (the lm_head and attention stay in the model's dtype)."""
        if self.fp8_matmul_rate is None:
            return flops / self.matmul_rate
        fp8_flops = 2 * projection_params(arch) * projection_tokens
        return fp8_flops / self.fp8_matmul_rate + (flops - fp8_flops) / self.matmul_rate

    def step_time(self, arch: ModelArchConfig, dtype: torch.dtype, new_tokens: float, kv_tokens_read: float,
                  attn_flops: float, lm_head_rows: int | None = None, weight_bytes: int | None = None,
                  kv_dtype: torch.dtype | None = None) -> float:
        """Floor for one forward: max(bytes / bandwidth, FLOPs / matmul rate). `weight_bytes`: of the model as
        loaded (`model_weight_bytes`), when it is not all in `dtype`; `kv_dtype`: the KV cache's, if not `dtype`."""
        if weight_bytes is None:
            weight_bytes = weight_bytes_per_step(arch, dtype)
        bytes_ = weight_bytes + kv_tokens_read * kv_bytes_per_token(arch, kv_dtype or dtype)
        flops = matmul_flops_per_token(arch) * new_tokens + attn_flops
        if lm_head_rows is not None:  # only sampled rows go through the lm_head
            flops -= 2 * arch.vocab_size * arch.hidden_size * (new_tokens - lm_head_rows)
        return max(bytes_ / self.bandwidth, self.compute_time(arch, flops, new_tokens))

    def rates(self) -> dict[str, float]:
        """The measured rates, for a result's record."""
        out = {"bandwidth_gb_s": self.bandwidth / 1e9, "matmul_tflop_s": self.matmul_rate / 1e12}
        if self.fp8_matmul_rate is not None:
            out["fp8_matmul_tflop_s"] = self.fp8_matmul_rate / 1e12
        return out


def measure(device: torch.device, dtype: torch.dtype, fp8: bool = False) -> Roofline:
    """The copy rate and the matmul rate of `dtype`; with `fp8`, the FP8 matmul rate too."""
    return Roofline(measure_bandwidth(device), measure_matmul(device, dtype),
                    measure_matmul(device, dtype, fp8=True) if fp8 else None)
