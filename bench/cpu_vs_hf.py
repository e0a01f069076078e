"""ember vs HF transformers on this CPU, SmolLM2-135M (the embedded model), in one run.

Single-stream decode tok/s, and N concurrent requests x T tokens through the engine, beside HF `generate` at
batch 1 and as a static (left-padded) batch of N. Both use the same weights (the GGUF, dequantized).

    .venv/bin/python bench/cpu_vs_hf.py [--tokens 64] [--batch 16] [--threads 2] [--dtype float32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

PROMPTS = [
    "Write a short story about a lighthouse keeper.", "Explain how vaccines work.",
    "What are the main causes of the French Revolution?", "Give me a recipe for pancakes.",
    "Describe the water cycle.", "How do airplanes stay in the air?", "Summarize the plot of Hamlet.",
    "What is machine learning?", "List some tips for better sleep.", "Why is the ocean salty?",
    "Explain the theory of relativity simply.", "What is the capital of Australia and why?",
    "How does a refrigerator work?", "Write a poem about the moon.", "What is photosynthesis?",
    "Describe a day in the life of a bee.", "How do I learn to play guitar?", "What causes earthquakes?",
    "Tell me about the history of chess.", "How does the internet work?",
]


def chat_ids(tok, i: int) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
    return tok.encode(text, add_special_tokens=False)


def bench_ember(llm, prompts: list[list[int]], tokens: int) -> float:
    from ember import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts[:1], sampling_params=sp.clone(max_tokens=4))  # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp)
    dt = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == tokens for o in outs)
    return len(prompts) * tokens / dt


def bench_hf(model, prompts: list[list[int]], tokens: int, pad_id: int) -> float:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as batched generation needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=pad_id)
    with torch.inference_mode():
        model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=4, **kw)  # warm-up
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        dt = time.perf_counter() - t
    assert out.shape[1] == width + tokens
    return len(prompts) * tokens / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dtype", default="float32", help="ember's weights dtype (HF stays float32)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of the four measurements")
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from ember import LLM
    from ember.model.loader import embedded_gguf_path

    llm = LLM(dtype=args.dtype)
    single = [chat_ids(llm.tokenizer, 0)]
    batch = [chat_ids(llm.tokenizer, i) for i in range(args.batch)]
    path = embedded_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    # Rounds alternate the four measurements, so a slow phase of this shared VM hits both sides alike;
    # the medians are reported, and every round in the JSON.
    runs: dict[str, list[float]] = {"ember_bs1_tok_s": [], f"ember_{args.batch}_concurrent_tok_s": [],
                                    "hf_bs1_tok_s": [], f"hf_static_batch{args.batch}_tok_s": []}
    for _ in range(args.repeats):
        runs["ember_bs1_tok_s"].append(bench_ember(llm, single, args.tokens))
        runs["hf_bs1_tok_s"].append(bench_hf(hf, single, args.tokens, 2))
        runs[f"ember_{args.batch}_concurrent_tok_s"].append(bench_ember(llm, batch, args.tokens))
        runs[f"hf_static_batch{args.batch}_tok_s"].append(bench_hf(hf, batch, args.tokens, 2))
    results = {k: statistics.median(v) for k, v in runs.items()}
    # Per-round ratios pair measurements taken seconds apart, so they cancel most of the VM's drift.
    results["bs1_ratio_ember_over_hf"] = statistics.median(
        e / h for e, h in zip(runs["ember_bs1_tok_s"], runs["hf_bs1_tok_s"], strict=True))
    results[f"batch{args.batch}_ratio_ember_over_hf"] = statistics.median(
        e / h for e, h in zip(runs[f"ember_{args.batch}_concurrent_tok_s"],
                              runs[f"hf_static_batch{args.batch}_tok_s"], strict=True))
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
            "threads": args.threads, "torch": torch.__version__, "ember_dtype": args.dtype,
            "tokens": args.tokens, "batch": args.batch, "repeats": args.repeats}
    print(f"{'measure':32s} {'median tok/s':>12s}  rounds")
    for k, v in results.items():
        print(f"{k:32s} {v:12.2f}  {' '.join(f'{x:.1f}' for x in runs.get(k, []))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, **results, "rounds": runs}, f, indent=2)


if __name__ == "__main__":
    main()
