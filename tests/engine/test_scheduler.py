"""Scheduler policy: token budget, FCFS, chunked prefill, preemption, sequence cap."""

from __future__ import annotations

from ember.engine.block_manager import BlockManager
from ember.engine.scheduler import Scheduler
from ember.engine.sequence import Request, Sequence, SequenceStatus
from ember.sampling_params import SamplingParams

_next = iter(range(10**6))


def seq_of(n: int, rid: str = "r") -> Sequence:
    return Sequence(next(_next), Request(rid, None, list(range(1, n + 1)), SamplingParams()), 0)


def run_step(sched: Scheduler):
    out = sched.schedule()
    for item in out.scheduled:
        item.seq.num_computed_tokens += item.num_new_tokens
        sched.bm.cache_full_blocks(item.seq)
        if item.samples:
            item.seq.token_ids.append(0)
    return out


def test_budget_splits_prefill_into_chunks_and_mixes_decodes():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a, b = seq_of(3, "a"), seq_of(25, "b")
    sched.add(a)
    run_step(sched)  # a prefilled
    sched.add(b)
    out = run_step(sched)
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 9)]
    assert not out.scheduled[1].samples
    out = run_step(sched)
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 9)]
    out = run_step(sched)
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 7)]
    assert out.scheduled[1].samples and b.num_output_tokens == 1


def test_fcfs_and_max_num_seqs():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [seq_of(3, str(i)) for i in range(4)]
    for s in seqs:
        sched.add(s)
    out = run_step(sched)
    assert [s.seq for s in out.scheduled] == seqs[:2]
    assert list(sched.waiting) == seqs[2:]
    sched.finish(seqs[0], "stop")
    out = run_step(sched)
    assert [s.seq for s in out.scheduled] == [seqs[1], seqs[2]]


def test_preemption_frees_newest_and_requeues_it_first():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    a, b = seq_of(7, "a"), seq_of(7, "b")
    sched.add(a)
    sched.add(b)
    run_step(sched)  # prompts of 7 computed: 2 blocks each, the cache is full
    assert bm.num_free_blocks == 0
    out = run_step(sched)  # 8th token of each still fits
    assert out.preempted == []
    out = run_step(sched)  # the 9th token of a needs a third block: b is preempted
    assert out.preempted == [b]
    assert [s.seq for s in out.scheduled] == [a]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert sched.waiting[0] is b and sched.num_preemptions == 1
    sched.finish(a, "stop")
    out = run_step(sched)
    assert [s.seq for s in out.scheduled] == [b]
    assert bm.num_free_blocks < 4


def test_finish_waiting_sequence_removes_it():
    sched = Scheduler(BlockManager(8, 4), max_num_seqs=4, max_num_batched_tokens=100)
    s = seq_of(3)
    sched.add(s)
    sched.finish(s, "abort")
    assert not sched.has_unfinished() and s.finish_reason == "abort"
