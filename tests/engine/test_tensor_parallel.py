"""Tensor parallelism: N processes, each with a slice of every layer, produce the tokens and logprobs of the
unsharded model (on CPUs with gloo; on two GPUs with NCCL where they exist); bad sizes, dead workers and
shutdowns are handled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ember import LLM, SamplingParams
from ember.config import EngineConfig
from ember.engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints) -> Path:
    # Large enough weights that greedy choices are not near-ties the order of a sum could flip.
    # Its own tokenizer: the GPU cases then run on machines without the embedded model's package.
    return tiny_checkpoints.write(tmp_path_factory.mktemp("tiny-tp"), tiny_checkpoints.weights(std=0.15),
                                  tokenizer=True)


# Short prompts and one that prefills in several chunks (max_num_batched_tokens=64) beside the others' decodes.
PROMPTS = [[1, 500, 7000, 42, 9], list(range(5, 150)), [3, 1000, 20000, 31000, 17, 17, 4]]


def _run(path: str, tp: int, **kwargs: object) -> list[tuple[list[int], list[float], list[float]]]:
    """(tokens, their logprobs, prompt logprobs) of a mixed batch: greedy, seeded sampling, long prompts in
    chunks, prompt logprobs."""
    llm = LLM(path, tensor_parallel_size=tp, max_model_len=256, kv_cache_memory_bytes=2 << 20,
              max_num_batched_tokens=64, **kwargs)
    try:
        params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1, prompt_logprobs=1),
                  SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1),
                  SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True, logprobs=1)]
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params)
        result = []
        for o in outs:
            c = o.outputs[0]
            lps = [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)]
            plps = [next(iter(p.values())).logprob for p in (o.prompt_logprobs or [])[1:]]
            result.append((c.token_ids, lps, plps))
        return result
    finally:
        llm.engine.close()


@pytest.mark.parametrize("device", [
    "cpu",
    # NCCL all-reduces between the GPUs, gloo for the step inputs; fp32, so the same tolerance holds.
    pytest.param("cuda", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")),
])
def test_two_ranks_match_one(tiny_dir: Path, device: str) -> None:
    one, two = _run(str(tiny_dir), 1, device=device, dtype="float32"), _run(str(tiny_dir), 2, device=device,
                                                                         dtype="float32")
    for (t1, lp1, p1), (t2, lp2, p2) in zip(one, two, strict=True):
        assert t1 == t2
        assert len(t1) == 10
        # All-reduced partial sums add up in another order than one matmul: equal to float rounding.
        assert torch.allclose(torch.tensor(lp1), torch.tensor(lp2), atol=1e-4)
        assert torch.allclose(torch.tensor(p1), torch.tensor(p2), atol=1e-4)


@pytest.mark.parametrize("device", [
    "cpu",
    # Decode steps replay CUDA graphs on every rank (their all-reduces captured), as by default on GPUs.
    pytest.param("cuda", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")),
])
def test_async_scheduling_across_ranks_matches_one_synchronous_rank(tiny_dir: Path, device: str) -> None:
    """Steps queued before the previous step's tokens are read back: a worker's inputs then include tokens only
    the driver's device holds, which it broadcasts after sampling. Greedy and seeded sampling, and a prompt in
    chunks beside decodes."""
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True)]
    results = []
    for tp, async_scheduling in ((1, False), (2, True)):
        with LLM(str(tiny_dir), tensor_parallel_size=tp, max_model_len=256, kv_cache_memory_bytes=2 << 20,
                 max_num_batched_tokens=64, device=device, dtype="float32",
                 async_scheduling=async_scheduling) as llm:
            assert llm.engine.async_scheduling is async_scheduling
            assert llm.engine.cuda_graphs_enabled is (device == "cuda")
            outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params)
            results.append([o.outputs[0].token_ids for o in outs])
    assert results[0] == results[1]
    assert all(len(t) == 12 for t in results[1])


def test_a_step_that_fails_to_sample_leaves_the_ranks_in_step(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error between a queued step's forward and the broadcast of its tokens (a sampler error, Ctrl-C): the
    workers still get a broadcast to end their wait, then the tokens of the step before, which the retried step's
    inputs need; the requests then finish as on one rank."""
    prompts = [PROMPTS[0], PROMPTS[2]]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    opts = dict(max_model_len=256, kv_cache_memory_bytes=2 << 20, device="cpu", dtype="float32")
    with LLM(str(tiny_dir), **opts) as one:
        expected = [o.outputs[0].token_ids for o in one.generate(prompt_token_ids=prompts, sampling_params=sp)]
    with LLM(str(tiny_dir), tensor_parallel_size=2, async_scheduling=True, **opts) as llm:
        engine = llm.engine
        sampler = engine.runner.sampler
        real, calls = sampler.sample, []

        def flaky(*args: object) -> torch.Tensor:
            calls.append(1)
            if len(calls) == 4:  # a decode step queued while the one before is still unread
                raise RuntimeError("sampler failed")
            return real(*args)

        monkeypatch.setattr(sampler, "sample", flaky)
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", None, p, sp.clone())
        finished: dict[str, list[int]] = {}

        def run() -> None:
            while engine.has_unfinished_requests():
                finished.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})

        with pytest.raises(RuntimeError, match="sampler failed"):
            run()
        run()
    assert [finished["r0"], finished["r1"]] == expected


def test_fp8_matmuls_on_three_ranks_each_quantizing_its_own_shards() -> None:
    """Each rank converts its slices of the projections (its own per-tensor scales); the partial sums of o_proj
    and down are scaled before the all-reduce, so the model still answers."""
    from ember.model.fp8 import Fp8Linear

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    with LLM(tensor_parallel_size=3, quantization="fp8", max_model_len=256, kv_cache_memory_bytes=8 << 20,
             device="cpu") as llm:
        layer = llm.engine.model.model.layers[0]
        assert isinstance(layer.self_attn.o_proj, Fp8Linear) and layer.self_attn.o_proj.in_features == 576 // 3
        out = llm.chat(msgs, sampling_params=SamplingParams(temperature=0, max_tokens=16))
    assert "Paris" in out[0].outputs[0].text


def test_heads_that_do_not_divide_are_refused(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by the tensor-parallel size 3"):
        LLMEngine(EngineConfig(model=str(tiny_dir), tensor_parallel_size=3, kv_cache_memory_bytes=1 << 20,
                               device="cpu"))


def test_more_ranks_than_gpus_are_refused_before_any_worker_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="--tensor-parallel-size 3 needs 3 GPUs, one a rank; 2 visible"):
        LLMEngine(EngineConfig(model="tiny-llama", load_format="dummy", device="cuda", tensor_parallel_size=3))


def test_a_shared_loaded_model_cannot_be_tensor_parallel(tiny_dir: Path) -> None:
    base = LLMEngine(EngineConfig(model=str(tiny_dir), kv_cache_memory_bytes=1 << 20))
    with pytest.raises(ValueError, match="cannot share a LoadedModel"):
        LLMEngine(EngineConfig(model=str(tiny_dir), tensor_parallel_size=2), base.loaded)


def test_cpu_ranks_share_the_cores() -> None:
    from ember.distributed.parallel import cpu_threads_per_rank

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
        mp.delenv("OMP_NUM_THREADS", raising=False)
        assert [cpu_threads_per_rank(n) for n in (1, 2, 3, 32)] == [16, 8, 5, 1]
        mp.setenv("OMP_NUM_THREADS", "4")  # the user's choice stands
        assert cpu_threads_per_rank(3) is None


def test_close_stops_the_workers_and_is_idempotent(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """...and gives the driver's process back the intra-op threads it had before its rank took its share."""
    from ember.distributed.parallel import cpu_threads_per_rank

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    own = cpu_threads_per_rank(2) + 1  # not a rank's share, on any machine
    torch.set_num_threads(own)
    try:
        with LLM(str(tiny_dir), tensor_parallel_size=2, kv_cache_memory_bytes=1 << 20) as llm:
            assert llm.engine.workers is not None
            assert torch.get_num_threads() == cpu_threads_per_rank(2)
            procs = list(llm.engine.workers.procs)
            assert all(p.is_alive() for p in procs)
        assert all(not p.is_alive() and p.exitcode == 0 for p in procs)  # exited on the stop message
        assert torch.get_num_threads() == own
        llm.close()  # again: nothing left to stop
    finally:
        torch.set_num_threads(before)


def test_a_dead_worker_fails_the_next_step_at_once(tiny_dir: Path) -> None:
    """The step's inputs go to the workers over gloo first: a killed worker is a connection error there, not a
    collective that waits out its timeout."""
    llm = LLM(str(tiny_dir), tensor_parallel_size=2, kv_cache_memory_bytes=1 << 20)
    assert llm.engine.workers is not None
    worker = llm.engine.workers.procs[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()
    t = time.monotonic()
    with pytest.raises(RuntimeError):
        llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams(max_tokens=4))
    assert time.monotonic() - t < 30
    llm.engine.close()


def test_idle_workers_outlive_the_model_timeout_and_ignore_ctrl_c(tiny_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker waits for the next step as long as the server is idle (the model's all-reduce timeout, 2 s here,
    does not apply to that wait), and a Ctrl-C that reaches the whole process group leaves it to the driver."""
    monkeypatch.setenv("EMBER_TP_TIMEOUT_S", "2")  # inherited by the spawned workers
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm = LLM(str(tiny_dir), tensor_parallel_size=2, kv_cache_memory_bytes=1 << 20)
    try:
        first = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=sp)[0].outputs[0].token_ids
        assert llm.engine.workers is not None
        worker = llm.engine.workers.procs[0]
        os.kill(worker.pid, signal.SIGINT)
        time.sleep(4.0)
        assert worker.is_alive()
        assert llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=sp)[0].outputs[0].token_ids == first
    finally:
        llm.engine.close()


def test_a_closed_engine_says_so(tiny_dir: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_dir), tensor_parallel_size=2, kv_cache_memory_bytes=1 << 20))
    engine.close()
    engine.add_request("r", None, [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="engine was closed"):
        engine.step()


def test_an_explicit_gpu_index_is_refused_with_tensor_parallelism() -> None:
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        LLMEngine(EngineConfig(model="tiny-llama", load_format="dummy", device="cuda:1", tensor_parallel_size=2))


def test_a_script_without_the_main_guard_fails_fast_and_says_why(tiny_dir: Path, tmp_path: Path) -> None:
    """Spawned workers re-import the main module: an unguarded script's workers die while starting, and the
    driver says so at once instead of waiting for them at the rendezvous."""
    script = tmp_path / "unguarded.py"
    script.write_text(f"from ember import LLM\nLLM({str(tiny_dir)!r}, tensor_parallel_size=2, "
                      "kv_cache_memory_bytes=1 << 20)\n")
    t = time.monotonic()
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "tensor-parallel worker 1 exited (code 1) while starting" in r.stderr
    assert "if __name__ == '__main__':" in r.stderr  # Python's own explanation, from the worker
    assert time.monotonic() - t < 60
