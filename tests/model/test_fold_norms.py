"""RMSNorm weights folded into the products after them (`LlamaForCausalLM.fold_norms`): the same tokens and
logprobs as the model as loaded, through the multi-token path (weightless norms) and the one-token path that
normalises inside the products (`LlamaDecoderLayer.forward_folded`; the GEMV on a GPU, `linear_ref` here)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ember import LLM, SamplingParams
from ember.model.linear import residual_in_products_setting
from ember.model.llama import LlamaDecoderLayer

PROMPTS = [[1, 500, 7000, 42, 9], [3, 1000, 20000, 31000, 17, 17, 4], [5]]


def _generate(llm: LLM, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp)
    return [(o.outputs[0].token_ids, [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs,
                                                                      strict=True)]) for o in outs]


def test_folded_norms_give_the_same_tokens(tmp_path: Path, tiny_checkpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tiny_checkpoints.weights(std=0.2, seed=3)
    g = torch.Generator().manual_seed(4)
    for name, w in weights.items():  # norm weights far from 1, so a norm applied twice or not at all shows
        if name.endswith("norm.weight"):
            weights[name] = torch.rand(w.shape, generator=g) * 2 + 0.25
    path = tiny_checkpoints.write(tmp_path, weights, tokenizer=True)
    kw = dict(max_model_len=64, kv_cache_memory_bytes=4 << 20, enable_prefix_caching=False)
    with LLM(str(path), **kw) as llm:
        assert not llm.engine.model.model.norms_folded  # on the CPU the loader never folds
        want_batch = _generate(llm, PROMPTS)
        want_alone = [_generate(llm, [p])[0] for p in PROMPTS]
    folded_steps = []
    original = LlamaDecoderLayer.forward_folded
    monkeypatch.setattr(LlamaDecoderLayer, "forward_folded",
                        lambda self, *a: folded_steps.append(1) or original(self, *a))
    with LLM(str(path), **kw) as llm:
        llm.engine.model.fold_norms()
        got_batch = _generate(llm, PROMPTS)
        assert not folded_steps  # several sequences a step: the multi-token path, with weightless norms
        got_alone = [_generate(llm, [p])[0] for p in PROMPTS]
        assert folded_steps  # one sequence: one token a decode step, normalised inside the products
    for (want_ids, want_lp), (got_ids, got_lp) in zip(want_batch + want_alone, got_batch + got_alone, strict=True):
        assert got_ids == want_ids
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(want_lp, got_lp, strict=True))


@pytest.mark.parametrize("min_tokens", [2, 4])
def test_residual_in_products_gives_the_same_tokens(tmp_path: Path, tiny_checkpoints,
                                                    monkeypatch: pytest.MonkeyPatch, min_tokens: int) -> None:
    """`LlamaDecoderLayer.forward_residual_in_products` (each residual added by the product before the norm; on a
    GPU inside cuBLAS, here by `linear_ref`): the same tokens and logprobs as the fused add + norm path. Steps of
    fewer than `residual_in_products_min_tokens` tokens (`EMBER_RESIDUAL_IN_PRODUCTS=N`) keep the usual path: at 2,
    only the one-sequence steps; at 4, also the three-sequence decodes."""
    path = tiny_checkpoints.write(tmp_path, tiny_checkpoints.weights(std=0.2, seed=5), tokenizer=True)
    kw = dict(max_model_len=64, kv_cache_memory_bytes=4 << 20, enable_prefix_caching=False)
    with LLM(str(path), **kw) as llm:
        assert not llm.engine.model.model.residual_in_products  # the loader sets it on a GPU only
        want = _generate(llm, PROMPTS)
    rows = []
    original = LlamaDecoderLayer.forward_residual_in_products
    monkeypatch.setattr(LlamaDecoderLayer, "forward_residual_in_products",
                        lambda self, positions, x, *a: rows.append(x.shape[0]) or original(self, positions, x, *a))
    with LLM(str(path), **kw) as llm:
        llm.engine.model.model.residual_in_products = True
        llm.engine.model.model.residual_in_products_min_tokens = min_tokens
        got = _generate(llm, PROMPTS)
    assert rows and min(rows) >= min_tokens  # the prompts' prefill (13 tokens) always takes it
    assert (3 in rows) == (min_tokens <= 3)  # the three-sequence decodes
    for (want_ids, want_lp), (got_ids, got_lp) in zip(want, got, strict=True):
        assert got_ids == want_ids
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(want_lp, got_lp, strict=True))


def test_residual_in_products_setting() -> None:
    assert residual_in_products_setting("0") == (False, 2)
    assert residual_in_products_setting("1") == (True, 2)
    assert residual_in_products_setting(" 1024") == (True, 1024)
    for bad in ("", "on", "-3", "2.5"):
        with pytest.raises(ValueError, match="EMBER_RESIDUAL_IN_PRODUCTS"):
            residual_in_products_setting(bad)
