"""The one-shot symmetric-memory all-reduce of small messages sums what NCCL sums, eagerly and in CUDA graphs;
larger ones fall back to NCCL. Needs two GPUs that can map each other's memory."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from ember.distributed import symmetric

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2 or not symmetric.usable(torch.device("cuda"), 2),
                                reason="needs two GPUs that map each other's memory (and EMBER_SYMM_ALL_REDUCE on)")


def _rank_main(rank: int, port: int, errors: mp.Queue) -> None:
    try:
        from ember.distributed.parallel import connect
        from ember.distributed.symmetric import MAX_BYTES

        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
        tp = connect(rank, 2, port, dev)
        assert tp.symm is not None, "symmetric memory unavailable on this machine"
        g = torch.Generator(device=dev).manual_seed(rank)
        for dtype in (torch.bfloat16, torch.float32):
            for numel in (64, 4096, 8 * 4096, MAX_BYTES // dtype.itemsize, 3 * MAX_BYTES // dtype.itemsize):
                x = torch.randn(numel, device=dev, dtype=dtype, generator=g)
                expect = x.clone()
                tp.group.allreduce([expect]).wait()
                before = x.clone()
                got = tp.all_reduce(x)
                assert tp.symm.fits(x) == (numel * dtype.itemsize <= MAX_BYTES)
                if tp.symm.fits(x):
                    assert torch.equal(x, before), "the one-shot path must leave its input alone"
                torch.testing.assert_close(got, expect, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)
        # Captured, then replayed on new data: as the decode graphs run it.
        x = torch.zeros(2, 4096, device=dev, dtype=torch.bfloat16)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            tp.all_reduce(x)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = tp.all_reduce(x)
        for i in range(3):
            x.copy_(torch.randn(x.shape, device=dev, generator=g).to(x.dtype) + i)
            expect = x.clone()
            tp.group.allreduce([expect]).wait()
            graph.replay()
            torch.cuda.synchronize(dev)
            torch.testing.assert_close(out, expect, rtol=1e-2, atol=1e-2)
        del graph
        tp.shutdown()
    except BaseException as e:  # reported to the test, which would otherwise see only an exit code
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise


def test_one_shot_all_reduce_matches_nccl(free_port: int) -> None:
    port = free_port
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, port, errors)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    for p in procs:  # a rank still waiting on the other: not left behind holding a GPU
        if p.is_alive():
            p.kill()
            p.join(10)
    msgs = [errors.get_nowait() for _ in range(errors.qsize())] if not errors.empty() else []
    assert all(p.exitcode == 0 for p in procs), msgs or [p.exitcode for p in procs]
