"""Tensor parallelism over two GPUs (NCCL all-reduces, gloo for the step inputs): the tokens of one GPU.
Skipped unless two GPUs are visible."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ember import LLM, SamplingParams
from ember.config import EngineConfig
from ember.engine.llm_engine import load_model
from ember.model.loader import resolve_model

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def test_two_gpus_match_one(device: str = "cuda") -> None:
    # Dummy weights are drawn per shard, so both runs read one checkpoint: the shipped tiny config's dummy model
    # written once in fp32 (ember's fused q/k/v and gate/up names: each rank cuts its rows from them).
    cfg = EngineConfig(model="tiny-llama", load_format="dummy", device="cpu")
    loaded = load_model(cfg)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(resolve_model(cfg).hf_config))
        state = {n: p.detach().contiguous() * 7.5 if p.dim() > 1 else p.detach().contiguous()
                 for n, p in loaded.model.named_parameters()}
        save_file(state, str(Path(d) / "model.safetensors"))
        prompts = [[1, 500, 7000, 42, 9], list(range(5, 150))]
        sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        results = []
        for tp in (1, 2):
            llm = LLM(d, tensor_parallel_size=tp, device=device, dtype="float32", max_model_len=256,
                      kv_cache_memory_bytes=64 << 20)
            try:
                results.append([o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts,
                                                                              sampling_params=sp)])
            finally:
                llm.engine.close()
    assert results[0] == results[1]
