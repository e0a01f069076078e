"""`ember bench hf`: HF transformers on the same device and the same weights, as the peer in the same run.

The HF model is built on the meta device and its parameters are pointed at ember's loaded tensors (q/k/v and
gate/up as views of ember's fused matrices), so both run exactly the same weights with no second copy.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from ember.bench.offline import random_prompts, run_info
from ember.config import EngineConfig
from ember.engine.llm_engine import load_model


def hf_model_sharing_weights(loaded: Any) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = loaded.arch
    cfg_dict = {"architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                   "qwen2": "Qwen2ForCausalLM"}[arch.model_type]],
                "model_type": arch.model_type, "vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size,
                "intermediate_size": arch.intermediate_size, "num_hidden_layers": arch.num_hidden_layers,
                "num_attention_heads": arch.num_attention_heads, "num_key_value_heads": arch.num_key_value_heads,
                "head_dim": arch.head_dim, "rms_norm_eps": arch.rms_norm_eps, "rope_theta": arch.rope_theta,
                "rope_scaling": arch.rope_scaling, "max_position_embeddings": arch.max_position_embeddings,
                "tie_word_embeddings": arch.tie_word_embeddings}
    config = AutoConfig.for_model(**cfg_dict)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    ours = dict(loaded.model.named_parameters(remove_duplicate=False))
    q = arch.num_attention_heads * arch.head_dim
    kv = arch.num_key_value_heads * arch.head_dim
    inter = arch.intermediate_size
    views = {}
    for name, p in ours.items():
        if "qkv_proj" in name:
            views[name.replace("qkv_proj", "q_proj")] = p[:q]
            views[name.replace("qkv_proj", "k_proj")] = p[q:q + kv]
            views[name.replace("qkv_proj", "v_proj")] = p[q + kv:]
        elif "gate_up_proj" in name:
            views[name.replace("gate_up_proj", "gate_proj")] = p[:inter]
            views[name.replace("gate_up_proj", "up_proj")] = p[inter:]
        else:
            views[name] = p
    missing = hf.load_state_dict(views, strict=False, assign=True)
    if missing.missing_keys:
        raise RuntimeError(f"HF parameters not covered: {missing.missing_keys[:4]}")
    # Buffers (rotary inv_freq) were created on meta: rebuild the rotary module on the device.
    # (A device context, not the `device` argument, which newer transformers versions dropped.)
    with torch.device(loaded.device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=config)
    return hf.eval()


def bench_hf(args: argparse.Namespace, config: EngineConfig) -> dict[str, Any]:
    loaded = load_model(config)
    hf = hf_model_sharing_weights(loaded)
    dev = loaded.device
    res: dict[str, Any] = {**run_info(dev, loaded.dtype, cuda_graphs=False), "bench": "hf"}
    ids = torch.tensor(random_prompts(1, args.input_len, loaded.arch.vocab_size), device=dev)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=args.output_len, min_new_tokens=args.output_len, **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        res["hf_generate_bs1_tok_s"] = args.output_len / (time.perf_counter() - t)
    if args.num_prompts:
        from transformers import GenerationConfig

        prompts = random_prompts(args.num_prompts, args.input_len, loaded.arch.vocab_size, seed=1)
        gen = GenerationConfig(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
        with torch.no_grad():  # generate_batch updates its cache outside inference mode
            t = time.perf_counter()
            out = hf.generate_batch(inputs=prompts, generation_config=gen)
            dt = time.perf_counter() - t
        n_out = sum(len(o.generated_tokens) for o in out.values())
        res.update({"hf_cb_num_prompts": args.num_prompts, "hf_cb_output_tok_s": n_out / dt,
                    "hf_cb_total_tok_s": (n_out + args.num_prompts * args.input_len) / dt, "hf_cb_elapsed_s": dt})
    res.update({"input_len": args.input_len, "output_len": args.output_len})
    return res
