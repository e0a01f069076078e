"""`bench/overlap_mixed.py`'s batches on the CPU: the mixed batch is its decodes and its chunks joined, so each
row's logits match those of the half it came from."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ember.config import EngineConfig
from ember.engine.llm_engine import LLMEngine

_spec = importlib.util.spec_from_file_location("overlap_mixed",
                                               Path(__file__).resolve().parents[2] / "bench" / "overlap_mixed.py")
assert _spec is not None and _spec.loader is not None
overlap_mixed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(overlap_mixed)


@torch.inference_mode()
def test_mixed_batch_rows_match_its_halves() -> None:
    eng = LLMEngine(EngineConfig(model="tiny-llama", load_format="dummy", max_model_len=64, device="cpu"))
    runner = eng.runner
    overlap_mixed.fill_cache(runner.kv_caches)
    gen = torch.Generator().manual_seed(0)
    blocks = iter(range(1, runner.kv_caches[0][0].shape[0]))
    vocab = eng.arch.vocab_size
    dec = overlap_mixed.host_batch([1] * 3, [20, 33, 9], blocks, runner.block_size, vocab, gen)
    pre = overlap_mixed.host_batch([7, 18], [0, 0], blocks, runner.block_size, vocab, gen)
    mix = overlap_mixed.joined(dec, pre)
    assert mix.query_lens == [1, 1, 1, 7, 18] and mix.logits_indices == [0, 1, 2, 9, 27]
    assert len({*mix.slots}) == len(mix.slots)  # every token its own cache slot

    def logits(batch):
        return overlap_mixed.sampled_logits(eng, runner.device_inputs(batch))

    both = logits(mix)
    torch.testing.assert_close(both[:3], logits(dec))
    torch.testing.assert_close(both[3:], logits(pre))
    eng.close()
