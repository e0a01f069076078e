"""The architecture description ember needs, read from a Hugging Face config.json (or GGUF metadata)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# architectures / model_type values -> (whether q/k/v projections carry a bias)
SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_MODEL_TYPES = set(SUPPORTED.values())


class UnsupportedModelError(ValueError):
    pass


# What ember loads of compressed-tensors: 8-bit float weights with one scale per tensor or per output row.
_FP8_FORMATS = ("float-quantized", "naive-quantized")  # the same storage: float8_e4m3fn weight + fp32 weight_scale
_FP8_WEIGHT_STRATEGIES = ("tensor", "channel")
_SUPPORTED_QUANTIZATION = ("ember loads unquantized checkpoints and FP8 ones in the compressed-tensors format "
                           "(8-bit float weights, per-tensor or per-channel scales, as in "
                           "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8)")


@dataclass(frozen=True)
class Fp8Scheme:
    """One compressed-tensors config group: how its weights are scaled, and how an FP8 matmul would quantize its
    inputs (a calibrated `input_scale`, or scales computed per token at run time; None: weight-only FP8)."""

    weight_strategy: str  # "tensor": one scale per matrix | "channel": one per output row
    input_strategy: str | None = None  # "tensor" | "token"
    input_dynamic: bool = False

    def describe(self) -> str:
        weights = f"per-{self.weight_strategy} weight scales"
        if self.input_strategy is None:
            return weights + ", unquantized activations"
        kind = "dynamic" if self.input_dynamic else "static"
        return f"{weights}, {kind} per-{self.input_strategy} activation scales"


def _unsupported_quantization(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"unsupported quantization: {what}; {_SUPPORTED_QUANTIZATION}")


def fp8_schemes(qcfg: dict[str, Any] | None) -> tuple[Fp8Scheme, ...]:
    """The FP8 schemes of a config.json `quantization_config` (empty: not quantized); refuse what ember cannot
    load. Read from the config, so a checkpoint ember cannot run fails before any weight is read."""
    if not qcfg:
        return ()
    method = qcfg.get("quant_method")
    if method != "compressed-tensors":
        raise _unsupported_quantization(f"quant_method {method!r}")
    if qcfg.get("kv_cache_scheme"):  # k_scale/v_scale for an FP8 KV cache, which ember does not have
        raise _unsupported_quantization("an FP8 KV cache (kv_cache_scheme)")
    if qcfg.get("transform_config"):  # rotations that the model code would have to apply at run time
        raise _unsupported_quantization("compressed-tensors transforms (transform_config)")
    sparsity = qcfg.get("sparsity_config")
    if sparsity and sparsity.get("format", "dense") != "dense":
        raise _unsupported_quantization(f"sparse weights ({sparsity.get('format')!r})")
    groups = qcfg.get("config_groups") or {}
    if not groups:
        raise _unsupported_quantization("compressed-tensors without config_groups")
    return tuple(_fp8_group(name, group, qcfg.get("format")) for name, group in groups.items())


def _fp8_group(name: str, group: dict[str, Any], default_format: str | None) -> Fp8Scheme:
    fmt = group.get("format") or default_format
    if fmt not in _FP8_FORMATS:
        raise _unsupported_quantization(f"compressed-tensors format {fmt!r} ({name})")
    w = group.get("weights") or {}
    bits, kind, strategy = w.get("num_bits", 8), w.get("type", "int"), _strategy(w)
    if (bits, kind) != (8, "float"):
        raise _unsupported_quantization(f"{bits}-bit {kind} weights ({name})")
    if strategy not in _FP8_WEIGHT_STRATEGIES:
        raise _unsupported_quantization(f"FP8 weight strategy {strategy!r} ({name}); supported: "
                                        f"{', '.join(_FP8_WEIGHT_STRATEGIES)}")
    if not w.get("symmetric", True) or w.get("dynamic", False):
        raise _unsupported_quantization(f"asymmetric or dynamic FP8 weights ({name})")
    if group.get("output_activations"):
        raise _unsupported_quantization(f"quantized output activations ({name})")
    a = group.get("input_activations")
    if not a:
        return Fp8Scheme(strategy)
    a_strategy, dynamic = _strategy(a), a.get("dynamic", False)
    static_tensor = dynamic is False and a_strategy == "tensor" and a.get("symmetric", True)
    dynamic_ok = dynamic is True and a_strategy in ("tensor", "token")
    if (a.get("num_bits", 8), a.get("type", "int")) != (8, "float") or not (static_tensor or dynamic_ok):
        raise _unsupported_quantization(
            f"input activations {a.get('num_bits', 8)}-bit {a.get('type', 'int')}, strategy {a_strategy!r}, "
            f"dynamic {dynamic!r} ({name}); supported: FP8, static per-tensor or dynamic per-token")
    return Fp8Scheme(strategy, a_strategy, dynamic is True)


def _strategy(args: dict[str, Any]) -> str:
    # compressed-tensors' defaults for fields a config leaves out (as its other defaults above: 8-bit int,
    # symmetric, static): per-group with a group size, else per-tensor.
    return args.get("strategy") or ("group" if args.get("group_size") else "tensor")


@dataclass
class ModelArchConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int | None = None
    torch_dtype: str | None = None
    # One per compressed-tensors config group; empty for an unquantized checkpoint.
    quantization: tuple[Fp8Scheme, ...] = ()

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelArchConfig:
        archs = cfg.get("architectures") or []
        model_type = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
        if model_type is None and cfg.get("model_type") in SUPPORTED_MODEL_TYPES:
            model_type = cfg["model_type"]
        if model_type is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; ember supports "
                f"{', '.join(SUPPORTED)} (model_type {', '.join(sorted(SUPPORTED_MODEL_TYPES))})")
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {cfg['hidden_act']!r}; only silu")
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        # Qwen2 configs carry a sliding_window that is only used when use_sliding_window is set.
        window = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None and isinstance(cfg.get("rope_parameters"), dict):  # transformers 5 layout
            rp = cfg["rope_parameters"]
            rope_theta = rp.get("rope_theta")
            if rp.get("rope_type", "default") != "default":
                rope_scaling = rp
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind not in ("default", "llama3", None):
                raise UnsupportedModelError(f"unsupported rope_scaling type {kind!r}; supported: llama3")
            if kind in ("default", None):
                rope_scaling = None
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            rope_scaling=rope_scaling,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=window,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            quantization=fp8_schemes(cfg.get("quantization_config")),
        )
