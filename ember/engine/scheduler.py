"""Continuous batching: which sequences run this step, and how many of their tokens.

One token budget per step is shared by decodes (one token each) and prefill chunks, running sequences first
(FCFS), then waiting ones. When the KV cache runs out, the most recently admitted running sequence is
preempted: its blocks are freed and it is recomputed later (its full blocks usually come back from the prefix
cache).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ember.engine.block_manager import BlockManager
from ember.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    samples: bool = False  # whether this step reaches the end of the sequence's tokens, so a token is sampled

    def __post_init__(self) -> None:
        self.samples = self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, skip: Callable[[Sequence], bool] | None = None) -> SchedulerOutput:
        """`skip`: running sequences that get no step (nor a block for one) this time: those whose token still on
        the device is certainly their last. They free their blocks when it is read back, so while there are any,
        a sequence that finds no free block waits a step instead of preempting another."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        kept: list[Sequence] = []
        queue = list(self.running)
        finishing = {s.seq_id for s in queue if skip(s)} if skip is not None else set()
        # Running sequences, oldest first; the newest are preempted when blocks run out.
        while queue and budget > 0:
            seq = queue.pop(0)
            if seq.seq_id in finishing:
                kept.append(seq)
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n == 0:  # nothing to compute (cannot happen while every step samples; kept safe)
                kept.append(seq)
                continue
            if finishing and not self.bm.can_allocate(seq, n):
                kept.append(seq)
                continue
            while not self.bm.allocate(seq, n):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, n))
                kept.append(seq)
                budget -= n
        kept.extend(queue)  # running sequences that got no budget this step stay running
        self.running = kept
        # Admit waiting sequences only when nothing had to be preempted.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            # Prompt logprobs need every prompt position computed, so such requests skip the prefix cache.
            fresh = seq.num_computed_tokens == 0 and not seq.request.wants_prompt_logprobs(seq)
            cached = self.bm.find_cached_prefix(seq) if fresh else []
            remaining = seq.num_tokens - len(cached) * self.bm.block_size
            n = min(remaining, budget)
            if n < remaining and not self.enable_chunked_prefill:
                break
            if not self.bm.allocate(seq, n, cached):
                break
            self.waiting.popleft()
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = len(cached) * self.bm.block_size
            seq.status = SequenceStatus.RUNNING
            if seq.request.first_scheduled_time is None:  # queue time (a metric) ends here
                seq.request.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop the KV, keep the tokens, go back to the front of the queue."""
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark a sequence finished and free its blocks at once (works for waiting and running ones)."""
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.bm.free(seq)
