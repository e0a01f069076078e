"""The ranks agree on the one-shot all-reduce before using it: a step that fails on one rank alone (the check,
the local set-up, the rendezvous) leaves every rank on NCCL, none waiting in a kernel the others never run.
Two gloo processes on the CPU, the symmetric-memory parts replaced by stand-ins that fail where told."""

from __future__ import annotations

import datetime
import multiprocessing as mp

import pytest
import torch


class _FakeSymm:
    def __init__(self, fail_rendezvous: bool) -> None:
        self.fail_rendezvous = fail_rendezvous
        self.closed = False

    def rendezvous(self) -> None:
        if self.fail_rendezvous:
            raise RuntimeError("rendezvous failed here")

    def close(self) -> None:
        self.closed = True


def _rank_main(rank: int, port: int, scenario: str, results: mp.Queue) -> None:
    from ember.distributed import parallel, symmetric
    from ember.distributed.symmetric import SymmetricAllReduce

    tp = parallel.connect(rank, 2, port, torch.device("cpu"))
    made: list[_FakeSymm] = []
    symmetric.usable = lambda device, size: not (scenario == "unusable_on_1" and rank == 1)

    def prepare(*args: object) -> _FakeSymm:
        if scenario == "prepare_fails_on_1" and rank == 1:
            raise RuntimeError("prepare failed here")
        made.append(_FakeSymm(scenario == "rendezvous_fails_on_0" and rank == 0))
        return made[-1]

    SymmetricAllReduce.prepare = prepare
    got = parallel._symmetric_all_reduce(tp, port, torch.device("cuda"), datetime.timedelta(seconds=30))
    results.put((rank, got is not None, [m.closed for m in made]))


@pytest.mark.parametrize(("scenario", "expect"), [
    ("ok", {0: (True, [False]), 1: (True, [False])}),
    ("unusable_on_1", {0: (False, []), 1: (False, [])}),
    ("prepare_fails_on_1", {0: (False, [True]), 1: (False, [])}),
    ("rendezvous_fails_on_0", {0: (False, [True]), 1: (False, [True])}),
])
def test_every_rank_takes_the_same_path(scenario: str, expect: dict, free_port: int) -> None:
    port = free_port
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, port, scenario, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in procs:
            rank, used, closed = results.get(timeout=120)
            got[rank] = (used, closed)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    assert got == expect
