"""Greedy output token-identical to HF transformers; logprobs close to HF's."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ember import LLM, SamplingParams

CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Tell me about ships."}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
]
TEXT_PROMPTS = ["The quick brown fox", "def fibonacci(n):", "1, 2, 3, 4, 5,", "Once upon a time, in a land"]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_smollm2_gguf_greedy_matches_hf(smol_llm, hf_smol):
    tok = smol_llm.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(m), add_special_tokens=False) for m in CHAT_PROMPTS]
    prompts += [tok.encode(p) for p in TEXT_PROMPTS]
    n = 24
    outs = smol_llm.generate(prompt_token_ids=prompts,
                             sampling_params=SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    for ids, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf_smol, ids, n)


def test_smollm2_logprobs_close_to_hf(smol_llm, hf_smol):
    ids = smol_llm.tokenizer.encode("The capital of France is")
    out = smol_llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
        temperature=0, max_tokens=6, logprobs=3, prompt_logprobs=2, ignore_eos=True))[0]
    gen = out.outputs[0].token_ids
    with torch.no_grad():
        ref = hf_smol(torch.tensor([ids + gen])).logits[0].log_softmax(-1)
    for i, (tok, pos) in enumerate(zip(gen, out.outputs[0].logprobs, strict=True)):
        expected = ref[len(ids) - 1 + i]
        assert math.isclose(pos[tok].logprob, expected[tok].item(), abs_tol=1e-3)
        assert pos[tok].rank == 1  # greedy picks the top token
        top = expected.topk(3).indices.tolist()
        assert [t for t in pos if t != tok][:2] == [t for t in top if t != tok][:2]
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(ids)
    for j in range(1, len(ids)):
        assert math.isclose(out.prompt_logprobs[j][ids[j]].logprob, ref[j - 1][ids[j]].item(), abs_tol=1e-3)


TINY = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=10000.0,
                  tie_word_embeddings=False),
    "llama31": dict(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1000000.0,
                  tie_word_embeddings=True),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", rope_theta=10000.0,
                    sliding_window=None),
}


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny_pair(request, tmp_path_factory):
    """A random tiny model saved as safetensors, loaded by both HF and ember."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = TINY[request.param]
    cfg = dict(vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
               bos_token_id=1, eos_token_id=2, torch_dtype="float32", **arch)
    d = tmp_path_factory.mktemp(request.param)
    (d / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d), dtype=torch.float32)
    # Bigger-than-default weights so that logits are not all near-ties.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
            elif name.endswith("bias"):  # Qwen2's q/k/v biases
                p.normal_(0, 0.1)
    hf.save_pretrained(d)
    llm = LLM(model=str(d), kv_cache_memory_bytes=64 << 20)
    return hf.eval(), llm


def test_tiny_models_greedy_match_hf(tiny_pair):
    hf, llm = tiny_pair
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (1, 5, 17, 40, 80)]
    outs = llm.generate(prompt_token_ids=prompts,
                        sampling_params=SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for ids, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, ids, 20)
