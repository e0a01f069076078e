"""The cost of constrained decoding on this machine: grammar engines side by side, then ember end to end.

    .venv/bin/python bench/structured_overhead.py compare [--reps 5]      # llguidance vs xgrammar, raw
    .venv/bin/python bench/structured_overhead.py e2e [--tokens 48]       # ember: grammar share of a step

`compare` (the tokenizer is the embedded SmolLM2's, vocab 49152):
  - tokenizer preparation (once per model) and cold compile time per grammar (no cache);
  - mask time per token: replaying the tokens of a valid document, one mask fill + one token accept per step,
    into a packed int32 bitmask (what both engines produce natively);
  - applying masks to a [B, V] float32 logits batch: one bool row per sequence (the original hook) vs one
    packed bitmask for the batch unpacked with a shift (ember.sampling.grammar) vs xgrammar's CPU kernel.
`e2e`: ember's LLM on the embedded model, JSON-schema-constrained batches of 1 and 8: the sampler's grammar
  hook time per step (mask fill + apply) and the token feedback per token, beside the whole step time (which
  includes prefill); first-request compile time (with and without the one-off tokenizer conversion).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

# (name, schema, a valid instance). Instances are serialized with ", " / ": " separators, the form every
# engine accepts in its non-flexible-whitespace mode.
CASES: list[tuple[str, dict[str, Any], Any]] = [
    ("person", {"type": "object", "properties": {"name": {"type": "string"},
                                                 "age": {"type": "integer", "minimum": 0, "maximum": 150}},
                "required": ["name", "age"]},
     {"name": "Ada Lovelace", "age": 36}),
    ("order", {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
            "customer": {"type": "object", "properties": {"name": {"type": "string"},
                                                          "email": {"type": "string"}},
                         "required": ["name", "email"]},
            "items": {"type": "array", "minItems": 1, "items": {
                "type": "object", "properties": {"sku": {"type": "string"},
                                                 "qty": {"type": "integer", "minimum": 1},
                                                 "price": {"type": "number", "minimum": 0}},
                "required": ["sku", "qty", "price"]}},
            "status": {"enum": ["pending", "paid", "shipped", "cancelled"]},
            "note": {"type": "string"},
        },
        "required": ["id", "customer", "items", "status"]},
     {"id": "ORD-123456", "customer": {"name": "Grace Hopper", "email": "grace@navy.mil"},
      "items": [{"sku": "A-1", "qty": 2, "price": 9.5}, {"sku": "B-22", "qty": 1, "price": 120.0}],
      "status": "shipped"}),
    ("enum60", {"type": "object", "properties": {
        "country": {"enum": [f"country-{i:02d}" for i in range(60)]},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue", "cyan"]}, "maxItems": 5}},
        "required": ["country", "tags"]},
     {"country": "country-42", "tags": ["red", "blue"]}),
    ("wide30", {"type": "object",
                "properties": {f"field_{i}": ({"type": "integer"} if i % 3 == 0 else
                                              {"type": "boolean"} if i % 3 == 1 else {"type": "string"})
                               for i in range(30)},
                "required": [f"field_{i}" for i in range(30)]},
     {f"field_{i}": (i if i % 3 == 0 else True if i % 3 == 1 else f"v{i}") for i in range(30)}),
    ("json_object", {"type": "object"},
     {"title": "Notes", "list": [1, 2.5, None, False], "nested": {"deep": {"x": "y"}}}),
]


def load_tokenizer() -> Any:
    from ember.model.loader import embedded_gguf_path
    from ember.tokenizer import Tokenizer

    return Tokenizer.load("", embedded_gguf_path(), set())


def doc_tokens(tok: Any, instance: Any) -> list[int]:
    return tok.encode(json.dumps(instance, separators=(", ", ": ")), add_special_tokens=False)


def timed(fn: Callable[[], Any], reps: int) -> float:
    """Best of `reps` wall times, seconds."""
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok: Any) -> None:
        import llguidance

        self.llg = llguidance
        self.version = llguidance.__version__
        t = time.perf_counter()
        self.lltok = llguidance.LLTokenizer(tok.hf.backend_tokenizer.to_str(), eos_token=sorted(tok.eos_token_ids))
        self.prep_s = time.perf_counter() - t

    def compile(self, schema: dict[str, Any]) -> Any:
        g = self.llg.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        m = self.llg.LLMatcher(self.lltok, g)
        assert not m.is_error(), m.get_error()
        return m

    def replay(self, compiled: Any, tokens: list[int], bitmask: torch.Tensor) -> list[float]:
        m = compiled
        m.reset()
        row = bitmask[0]
        out = []
        for t in tokens:
            s = time.perf_counter()
            m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
            ok = m.consume_token(t)
            out.append(time.perf_counter() - s)
            assert ok and (int(row[t // 32]) >> (t % 32)) & 1, m.get_error()
        return out


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok: Any) -> None:
        import importlib.metadata

        import xgrammar

        self.xgr = xgrammar
        self.version = importlib.metadata.version("xgrammar")
        t = time.perf_counter()
        # xgrammar reads a transformers tokenizer; ember's own may be the transformers-free one.
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=tok.hf.backend_tokenizer)
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=tok.vocab_size,
                                                       stop_token_ids=sorted(tok.eos_token_ids))
        self.prep_s = time.perf_counter() - t
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def replay(self, compiled: Any, tokens: list[int], bitmask: torch.Tensor) -> list[float]:
        m = self.xgr.GrammarMatcher(compiled)
        out = []
        for t in tokens:
            s = time.perf_counter()
            m.fill_next_token_bitmask(bitmask, 0)
            ok = m.accept_token(t)
            out.append(time.perf_counter() - s)
            assert ok
        return out


def compare(reps: int) -> dict[str, Any]:
    tok = load_tokenizer()
    vocab = tok.vocab_size
    words = (vocab + 31) // 32
    results: dict[str, Any] = {}
    for cls in (LLGuidance, XGrammar):
        try:
            eng = cls(tok)
        except ImportError as e:  # xgrammar is only a comparison point, not an ember dependency
            results[cls.name] = f"not installed: {e}"
            continue
        res: dict[str, Any] = {"version": eng.version, "tokenizer_prep_ms": round(eng.prep_s * 1e3, 1),
                               "compile_ms": {}, "mask_us_per_token": {}}
        all_steps: list[float] = []
        for name, schema, inst in CASES:
            res["compile_ms"][name] = round(timed(lambda s=schema, e=eng: e.compile(s), reps) * 1e3, 2)
            compiled = eng.compile(schema)
            bitmask = torch.zeros(1, words, dtype=torch.int32)
            toks = doc_tokens(tok, inst)
            steps = min((eng.replay(compiled, toks, bitmask) for _ in range(reps)), key=sum)
            all_steps += steps
            res["mask_us_per_token"][name] = round(statistics.mean(steps) * 1e6, 1)
        res["mask_us_all"] = {"mean": round(statistics.mean(all_steps) * 1e6, 1),
                              "p50": round(statistics.median(all_steps) * 1e6, 1),
                              "p99": round(sorted(all_steps)[int(0.99 * (len(all_steps) - 1))] * 1e6, 1),
                              "tokens": len(all_steps)}
        results[eng.name] = res
    results["apply_us"] = apply_costs(vocab, reps)
    return results


def apply_costs(vocab: int, reps: int) -> dict[str, dict[str, float]]:
    """Masking a [B, V] logits batch once every row's mask is known, for a sparse (1 % of tokens allowed, as
    inside a JSON string's structure) and a dense (50 %, as inside free text) mask."""
    import numpy as np

    from ember.sampling.grammar import apply_token_bitmask

    try:
        import xgrammar
    except ImportError:
        xgrammar = None

    out: dict[str, dict[str, float]] = {"bool_rows_masked_fill": {}, "packed_byte_table": {}, "xgrammar_cpu": {}}
    n = 20
    for b in (1, 8, 32):
        for density in (0.01, 0.5):
            key = f"B{b}_p{density}"
            logits = torch.randn(b, vocab)
            allowed = torch.rand(b, vocab) < density
            bits = torch.from_numpy(np.packbits(allowed.numpy(), axis=1, bitorder="little").view(np.int32).copy())

            def rows(allowed: torch.Tensor = allowed, logits: torch.Tensor = logits, b: int = b) -> None:
                # The original hook: a bool row per sequence, then one masked_fill over the gathered rows.
                mask = torch.zeros(b, vocab, dtype=torch.bool)
                for j in range(b):
                    mask[j] |= allowed[j]
                idx = torch.arange(b)
                logits[idx] = logits[idx].masked_fill(~mask, float("-inf"))

            def packed(lg: torch.Tensor = logits, bm: torch.Tensor = bits) -> None:
                apply_token_bitmask(lg, bm, None)

            def xgr(lg: torch.Tensor = logits, bm: torch.Tensor = bits) -> None:
                xgrammar.apply_token_bitmask_inplace(lg, bm)

            for name, fn in (("bool_rows_masked_fill", rows), ("packed_byte_table", packed), ("xgrammar_cpu", xgr)):
                if name == "xgrammar_cpu" and xgrammar is None:
                    continue
                out[name][key] = round(timed(lambda f=fn: [f() for _ in range(n)], reps) / n * 1e6, 1)
    return out


E2E_PROMPT = "Describe a fictional person as JSON with their name, age, city and hobbies."
E2E_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 40},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 6}},
    "required": ["name", "age", "city", "hobbies"]}


def e2e(tokens: int, reps: int, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Inside ember's engine: the time the sampler spends in the grammar hook per step and the engine's token
    feedback, beside the whole step time, for constrained batches of 1 and 8."""
    import ember.sampling.sampler as sampler_mod
    from ember import LLM, SamplingParams
    from ember.structured import StructuredOutputs, clear_cache, compile_structured
    from ember.structured.llguidance_backend import LLGuidanceMatcher

    llm = LLM(**engine_kwargs)
    tok = llm.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": E2E_PROMPT}]), add_special_tokens=False)
    res: dict[str, Any] = {}
    t = time.perf_counter()
    compile_structured(StructuredOutputs(json=E2E_SCHEMA), tok)
    res["first_compile_ms_incl_tokenizer_prep"] = round((time.perf_counter() - t) * 1e3, 1)
    clear_cache()
    t = time.perf_counter()
    compile_structured(StructuredOutputs(json=E2E_SCHEMA), tok)
    res["compile_ms_tokenizer_warm"] = round((time.perf_counter() - t) * 1e3, 2)
    t = time.perf_counter()
    compile_structured(StructuredOutputs(json=E2E_SCHEMA), tok)
    res["compile_ms_cached"] = round((time.perf_counter() - t) * 1e3, 3)

    timers = {"mask": 0.0, "accept": 0.0, "mask_calls": 0, "accepts": 0}
    hook = sampler_mod.apply_grammar_masks
    accept = LLGuidanceMatcher.accept_token

    def timed_hook(logits: torch.Tensor, matchers: list[Any]) -> None:
        t0 = time.perf_counter()
        hook(logits, matchers)
        timers["mask"] += time.perf_counter() - t0
        timers["mask_calls"] += any(m is not None for m in matchers)

    def timed_accept(self: LLGuidanceMatcher, token_id: int) -> bool:
        t0 = time.perf_counter()
        ok = accept(self, token_id)
        timers["accept"] += time.perf_counter() - t0
        timers["accepts"] += 1
        return ok

    sampler_mod.apply_grammar_masks = timed_hook  # type: ignore[assignment]
    LLGuidanceMatcher.accept_token = timed_accept  # type: ignore[method-assign]
    llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(temperature=0, max_tokens=4))  # warm-up
    spec = compile_structured(StructuredOutputs(json=E2E_SCHEMA), tok)
    for batch in (1, 8):
        for k in timers:
            timers[k] = 0
        sps = [SamplingParams(temperature=0.8, seed=i, max_tokens=tokens, structured_output=spec)
               for i in range(batch)]
        t = time.perf_counter()
        for _ in range(reps):
            llm.generate(prompt_token_ids=[ids] * batch, sampling_params=sps)
        wall = time.perf_counter() - t
        steps = int(timers["mask_calls"])
        res[f"batch{batch}"] = {
            "steps": steps, "wall_ms_per_step": round(wall / max(steps, 1) * 1e3, 2),
            "mask_ms_per_step": round(float(timers["mask"]) / max(steps, 1) * 1e3, 3),
            "accept_us_per_token": round(float(timers["accept"]) / max(int(timers["accepts"]), 1) * 1e6, 1)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["compare", "e2e"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None, help="e2e: a model other than the embedded one (e.g. on a GPU)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--max-model-len", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine_kwargs = {"model": args.model, "tokenizer": args.tokenizer, "load_format": args.load_format,
                     "max_model_len": args.max_model_len}
    out = (compare(args.reps) if args.mode == "compare"
           else e2e(args.tokens, max(1, args.reps // 2), {k: v for k, v in engine_kwargs.items() if v is not None}))
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": args.threads,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "model": args.model}
    print(json.dumps({"meta": meta, **out}, indent=1))


if __name__ == "__main__":
    main()
