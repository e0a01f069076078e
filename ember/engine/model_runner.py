"""Packs a scheduled step into flat tensors, runs the model once, and samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.attention import AttentionBackend, AttentionMetadata
from ember.distributed.parallel import TensorParallel
from ember.engine.cuda_graphs import DecodeBatch, DecodeGraphs
from ember.engine.scheduler import ScheduledSeq, SchedulerOutput
from ember.engine.sequence import Sequence
from ember.model.llama import LlamaForCausalLM
from ember.sampling.sampler import (
    LogprobRow,
    Sampler,
    SamplerOutput,
    SamplingBatch,
    argmax_suffices,
    logprob_rows,
)


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states whose next token is sampled
    sample_seqs: list[Sequence]
    # For prompt logprobs: (sequence, first position, row offset, number of rows) of prefill chunks.
    prompt_lp: list[tuple[Sequence, int, int, int]]


@dataclass
class HostBatch:
    """A step's flat batch as plain lists (picklable: sent to tensor-parallel workers)."""

    input_ids: list[int]  # 0 where the token is still on the device (async scheduling)
    positions: list[int]
    slots: list[int]
    query_start_loc: list[int]
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]  # padded with 0 to the longest
    logits_indices: list[int]


@dataclass
class WorkerStep:
    """What the driver sends its tensor-parallel workers each step, so that they run the same forward."""

    batch: HostBatch | DecodeBatch  # a DecodeBatch replays the captured graph of its size
    # (rows, src): input_ids[rows] = the tokens the driver sampled the step before, at `src` (async scheduling).
    pending: tuple[list[int], list[int]] | None
    shared_tokens: int  # after the forward, receive this many tokens the driver samples (0: none)
    # Before anything else, receive again the tokens `pending` indexes (0: no need): a failed step's stand-in
    # broadcast has replaced the workers' copy.
    resent_tokens: int = 0


@dataclass
class StepResult:
    sampled: SamplerOutput
    sample_seqs: list[Sequence]
    # (sequence, first position, rows): row j is the logprob of prompt token first + j + 1.
    prompt_logprobs: list[tuple[Sequence, int, list[LogprobRow]]]


@dataclass
class InflightStep:
    """A step queued on the device whose sampled tokens have not been read back (async scheduling)."""

    seqs: list[Sequence]  # the rows that sample, in order (none for a step of mid-prompt chunks)
    tokens: torch.Tensor  # [B] sampled tokens on the device: the next step's inputs, without a round trip
    host: torch.Tensor  # [B] on the CPU (pinned on CUDA), filled by a non-blocking copy of `tokens`
    # Recorded after that copy, even with no rows: waiting for it keeps at most one step in flight, which the
    # double-buffered host memory (here and in DecodeGraphs) relies on. None on the CPU (the step has run).
    event: torch.cuda.Event | None

    def token_ids(self) -> list[int]:
        """Waits for the step, then returns its tokens."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


@dataclass
class PendingInputs:
    """Input tokens still on the device: `input_ids[rows] = tokens[src]`, `tokens` sampled by the step before."""

    tokens: torch.Tensor
    rows: torch.Tensor
    src: torch.Tensor

    @classmethod
    def on_device(cls, tokens: torch.Tensor, where: tuple[list[int], list[int]], device: torch.device
                  ) -> PendingInputs:
        return cls(tokens, _to_device(where[0], torch.long, device), _to_device(where[1], torch.long, device))

    @staticmethod
    def locate(items: list[ScheduledSeq], prev: InflightStep | None) -> tuple[list[int], list[int]] | None:
        """(rows, src) of the input tokens that `prev` sampled and nobody has read back yet: row i of the flat
        batch takes prev's token src[i]; None if there are none.

        A sequence has at most one such token (one step is in flight at a time), its newest, at position
        len(token_ids); its row is wherever the sequence's chunk puts that position in the flat batch: the
        decode's only row, or the last row of a chunk that recomputes a preempted sequence up to it.
        """
        rows: list[int] = []
        owners: list[Sequence] = []
        row0 = 0
        for item in items:
            seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            known = len(seq.token_ids)
            if start + n > known:
                assert start + n == known + 1, f"{seq}: more than one input token not read back"
                rows.append(row0 + known - start)
                owners.append(seq)
            row0 += n
        if not rows:
            return None
        assert prev is not None, "a pending token without the step that samples it"
        src = {s.seq_id: j for j, s in enumerate(prev.seqs)}
        return rows, [src[s.seq_id] for s in owners]

    def apply(self, input_ids: torch.Tensor) -> None:
        input_ids.index_copy_(0, self.rows, self.tokens.index_select(0, self.src))


def _to_device(data: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # A non-blocking copy from pageable memory: staged at once, without waiting for the queued GPU work that
    # async scheduling overlaps (pinning a fresh host buffer each step costs more than it saves).
    return torch.tensor(data, dtype=dtype).to(device, non_blocking=True)


def cache_slot(block_table: list[int], position: int, block_size: int) -> int:
    """The flat KV-cache slot that holds a sequence's token at `position`."""
    return block_table[position // block_size] * block_size + position % block_size


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 block_size: int, device: torch.device, attn: AttentionBackend, sampler: Sampler | None,
                 tp: TensorParallel | None = None) -> None:
        self.model = model
        self.tp = tp or TensorParallel()
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.attn = attn
        self.sampler = sampler
        self.vocab_size = model.config.vocab_size
        self.graphs: DecodeGraphs | None = None
        self._pinned: list[torch.Tensor] = []
        self._shared_tokens: torch.Tensor | None = None  # a worker's copy of the driver's last sampled tokens
        self._resend_tokens = False  # the driver's: a failed step broadcast zeros in place of its tokens

    def _tensor(self, data: list[int], dtype: torch.dtype) -> torch.Tensor:
        return _to_device(data, dtype, self.device)

    def prepare(self, sched: SchedulerOutput, prev: InflightStep | None = None,
                share_tokens: bool = False) -> StepInputs:
        """`share_tokens`: the sampled tokens will be broadcast to the workers (async scheduling)."""
        batch, sample_seqs, prompt_lp = self._pack(sched)
        where = self._start(batch, sched.scheduled, prev, len(sample_seqs) if share_tokens else 0)
        inp = self.device_inputs(batch)
        if where is not None:
            assert prev is not None
            PendingInputs.on_device(prev.tokens, where, self.device).apply(inp.input_ids)
        inp.sample_seqs, inp.prompt_lp = sample_seqs, prompt_lp
        return inp

    def _start(self, batch: HostBatch | DecodeBatch, items: list[ScheduledSeq], prev: InflightStep | None,
               shared_tokens: int) -> tuple[list[int], list[int]] | None:
        """Send the workers this step, if there are any; returns where the step's inputs still on the device
        (sampled by `prev`, not read back) go, (rows, src) as `PendingInputs.locate` finds them, which the caller
        places after the host's."""
        where = PendingInputs.locate(items, prev)
        self._send_to_workers(batch, where, shared_tokens, prev)
        return where

    def _send_to_workers(self, batch: HostBatch | DecodeBatch, where: tuple[list[int], list[int]] | None,
                         shared_tokens: int, prev: InflightStep | None) -> None:
        if not self.tp.enabled:
            return
        # The workers run the same forward, joining its all-reduces.
        resend = prev.tokens if self._resend_tokens and where is not None and prev is not None else None
        self._resend_tokens = False  # later steps' inputs come from steps that broadcast their own tokens
        self.tp.broadcast_object(("step", WorkerStep(batch, where, shared_tokens,
                                                     0 if resend is None else resend.numel())))
        if resend is not None:
            self.tp.broadcast(resend)

    def _pack(self, sched: SchedulerOutput
              ) -> tuple[HostBatch, list[Sequence], list[tuple[Sequence, int, int, int]]]:
        """The flat batch of a step as lists (what tensor-parallel workers are sent to run the same forward),
        the sequences that sample, and the prefill chunks that want prompt logprobs."""
        bs = self.block_size
        b = HostBatch([], [], [], [0], [], [], [], [])
        sample_seqs: list[Sequence] = []
        prompt_lp: list[tuple[Sequence, int, int, int]] = []
        max_blocks = max(len(s.seq.block_table) for s in sched.scheduled)
        for item in sched.scheduled:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            row0 = len(b.input_ids)
            b.input_ids.extend(seq.token_ids[start:start + n])
            # An input still on the device (sampled by the step in flight, not read back) is filled in later.
            b.input_ids.extend([0] * (row0 + n - len(b.input_ids)))
            b.positions.extend(range(start, start + n))
            bt = seq.block_table
            b.slots.extend(cache_slot(bt, p, bs) for p in range(start, start + n))
            b.query_start_loc.append(b.query_start_loc[-1] + n)
            b.query_lens.append(n)
            b.seq_lens.append(start + n)
            b.block_tables.append(bt + [0] * (max_blocks - len(bt)))
            if item.samples:
                b.logits_indices.append(row0 + n - 1)
                sample_seqs.append(seq)
            if seq.request.wants_prompt_logprobs(seq) and start < seq.num_prompt_tokens:
                prompt_lp.append((seq, start, row0, min(n, seq.num_prompt_tokens - start)))
        return b, sample_seqs, prompt_lp

    def device_inputs(self, b: HostBatch) -> StepInputs:
        # Host-to-device copies only: attention may read the lengths and block tables before its PDL wait
        # (`ember.kernels.pdl`), which a kernel writing them would make unsafe.
        meta = AttentionMetadata(
            slot_mapping=self._tensor(b.slots, torch.int64),
            query_start_loc=self._tensor(b.query_start_loc, torch.int32),
            seq_lens=self._tensor(b.seq_lens, torch.int32),
            block_tables=self._tensor([x for t in b.block_tables for x in t], torch.int32).view(
                len(b.block_tables), len(b.block_tables[0])),
            max_query_len=max(b.query_lens),
            max_seq_len=max(b.seq_lens),
            query_lens_cpu=b.query_lens,
            seq_lens_cpu=b.seq_lens,
        )
        return StepInputs(self._tensor(b.input_ids, torch.int64), self._tensor(b.positions, torch.int64), meta,
                          self._tensor(b.logits_indices, torch.int64), [], [])

    @torch.inference_mode()
    def forward_on_worker(self, step: WorkerStep) -> None:
        """A tensor-parallel worker's share of a step: the same forward as the driver's (eager, or the replay of
        the same captured graph), whose collectives it joins; the driver alone computes logits and samples, and
        with async scheduling broadcasts the tokens, which a later step's inputs may need."""
        if step.resent_tokens:
            received = torch.empty(step.resent_tokens, dtype=torch.long, device=self.device)
            self._shared_tokens = self.tp.broadcast(received)
        tokens = self._shared_tokens
        if step.pending is not None:
            assert tokens is not None, "an input token the driver never shared"
        if isinstance(step.batch, DecodeBatch):
            assert self.graphs is not None, "the driver replays a decode graph this worker did not capture"
            self.graphs.run(step.batch, step.pending, tokens)
        else:
            inp = self.device_inputs(step.batch)
            if step.pending is not None:
                assert tokens is not None
                PendingInputs.on_device(tokens, step.pending, self.device).apply(inp.input_ids)
            self.model(inp.input_ids, inp.positions, self.kv_caches, inp.meta, self.attn)
        if step.shared_tokens:
            received = torch.empty(step.shared_tokens, dtype=torch.long, device=self.device)
            self._shared_tokens = self.tp.broadcast(received)

    def enable_cuda_graphs(self, max_batch: int, max_blocks_per_seq: int) -> float:
        """Capture decode graphs (every rank of a tensor-parallel group, in step: their all-reduces are in the
        graphs); returns the capture time in seconds."""
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.attn, max_batch, max_blocks_per_seq,
                                   self.device, with_logits=self.sampler is not None)
        self.graphs.capture()
        return self.graphs.capture_s

    def release_graphs(self) -> None:
        """Free the captured graphs (before a tensor-parallel group's teardown: theirs hold its all-reduces). The
        caller has let the device drain, with a bound: a second, unbounded wait here would hang on a replay whose
        all-reduces a dead worker never joins."""
        self.graphs = None

    def _graph_logits(self, sched: SchedulerOutput, prev: InflightStep | None,
                      share_tokens: bool = False) -> torch.Tensor | None:
        """Logits of a step of pure decodes (no prompt logprobs) that fits a captured graph, run by replay."""
        g = self.graphs
        items = sched.scheduled
        if g is None or len(items) > g.max_batch or not all(i.num_new_tokens == 1 and i.samples for i in items):
            return None
        if any(i.seq.request.wants_prompt_logprobs(i.seq) for i in items):
            return None
        bs = self.block_size
        seqs = [i.seq for i in items]
        pos = [s.num_computed_tokens for s in seqs]
        batch = DecodeBatch([s.token_ids[p] if p < len(s.token_ids) else 0 for s, p in zip(seqs, pos, strict=True)],
                            pos, [cache_slot(s.block_table, p, bs) for s, p in zip(seqs, pos, strict=True)],
                            [p + 1 for p in pos], [s.block_table for s in seqs])
        where = self._start(batch, items, prev, len(seqs) if share_tokens else 0)
        return g.run(batch, where, None if prev is None else prev.tokens)

    def _host_buffer(self, n: int) -> torch.Tensor:
        """Where a step's tokens land on the host: two pinned buffers in turn (at most one step is in flight
        while the previous one is read)."""
        if self.device.type != "cuda":
            return torch.empty(n, dtype=torch.long)
        if not self._pinned or self._pinned[0].shape[0] < n:
            size = max(n, 256)
            self._pinned = [torch.empty(size, dtype=torch.long).pin_memory() for _ in range(2)]
        self._pinned.reverse()
        return self._pinned[0][:n]

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, prev: InflightStep | None) -> InflightStep:
        """Queue a step (decodes and prefill chunks) and its sampling without waiting for the GPU; only the rows
        that sample produce tokens. Inputs that `prev` sampled are read from its device tensor. Pure decodes
        replay a CUDA graph when one fits, anything else runs eagerly. (Only for steps without prompt logprobs
        whose sampling rows need no host-side state of the newest token: no grammar, penalties, min_tokens or
        logprobs; the engine checks.) A step that fails leaves `prev` as it found it, for the engine to retry."""
        g = self.graphs
        turn = g.turn if g is not None else 0
        try:
            return self._launch(sched, prev)
        except BaseException:
            if g is not None:
                g.rewind(turn)
            self._restore_tokens(prev)
            raise

    def _restore_tokens(self, prev: InflightStep | None) -> None:
        """A greedy graph step leaves its tokens in the graphs' `tokens`, which the next replay overwrites with
        its own: if that next step then failed, put `prev`'s back from their read-back."""
        g = self.graphs
        if prev is None or g is None or prev.tokens.data_ptr() != g.tokens.data_ptr():
            return
        if prev.event is not None:
            prev.event.synchronize()
        g.tokens[:prev.tokens.numel()].copy_(prev.host)

    def _launch(self, sched: SchedulerOutput, prev: InflightStep | None) -> InflightStep:
        logits = self._graph_logits(sched, prev, share_tokens=True)
        graphed = logits is not None
        if graphed:
            seqs = [i.seq for i in sched.scheduled]
        else:
            inp = self.prepare(sched, prev, share_tokens=True)
            assert not inp.prompt_lp, "launch: prompt logprobs are read back in the step, synchronously"
            hidden = self.model(inp.input_ids, inp.positions, self.kv_caches, inp.meta, self.attn)
            seqs = inp.sample_seqs
            if seqs:
                logits = self.model.compute_logits(hidden.index_select(0, inp.logits_indices))
        from_graph = False  # the graph copied its greedy tokens to the host itself
        if logits is None:  # mid-prompt chunks only
            tokens = torch.empty(0, dtype=torch.long, device=self.device)
        else:
            try:
                batch = SamplingBatch.build(seqs, self.vocab_size, logits.device)
                if graphed and argmax_suffices(batch):
                    assert self.graphs is not None
                    tokens = self.graphs.tokens[:len(seqs)]  # the graph took them
                    from_graph = self.graphs.host_tokens is not None
                else:
                    # The sampler may edit the graph's output buffer in place: the next replay rewrites all of it.
                    tokens = self.sampler.sample(logits, batch)
            except BaseException:
                # The workers wait for this step's tokens: without them, the next collective would pair with
                # that wait. Nobody reads these zeros (the step failed, its sequences did not advance), but they
                # replace the workers' copy of the step before's tokens, which the next step's inputs may need.
                if self.tp.enabled:
                    self.tp.broadcast(torch.zeros(len(seqs), dtype=torch.long, device=self.device))
                    self._resend_tokens = True
                raise
            self.tp.broadcast(tokens)  # the workers' copy, for the next step's inputs
        if from_graph:
            assert self.graphs is not None and self.graphs.host_tokens is not None
            host = self.graphs.host_tokens
        elif self.device.type != "cuda":  # graphed (CPU tests): a copy, the graphs' `tokens` change on the next step
            host = tokens.clone() if graphed else tokens
        else:
            host = self._host_buffer(len(seqs))
            host.copy_(tokens, non_blocking=True)
        if self.device.type != "cuda":
            return InflightStep(seqs, tokens, host, None)
        event = torch.cuda.Event()
        event.record()
        return InflightStep(seqs, tokens, host, event)

    def _graph_decode(self, sched: SchedulerOutput) -> StepResult | None:
        logits = self._graph_logits(sched, None)
        if logits is None:
            return None
        seqs = [i.seq for i in sched.scheduled]
        batch = SamplingBatch.build(seqs, self.vocab_size, logits.device)
        # The sampler may edit the graph's output buffer in place: the next replay rewrites all of it.
        return StepResult(self.sampler(logits, batch), seqs, [])

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        graphed = self._graph_decode(sched)
        if graphed is not None:
            return graphed
        inp = self.prepare(sched)
        hidden = self.model(inp.input_ids, inp.positions, self.kv_caches, inp.meta, self.attn)
        prompt_rows: list[tuple[Sequence, int, list[LogprobRow]]] = []
        for seq, first, row0, n in inp.prompt_lp:
            # The last prompt position predicts the first output token, not a prompt token.
            n_pred = min(n, seq.num_prompt_tokens - 1 - first)
            if n_pred <= 0:
                continue
            logits = self.model.compute_logits(hidden[row0:row0 + n_pred])
            nxt = torch.tensor(seq.token_ids[first + 1:first + 1 + n_pred], device=logits.device)
            rows = logprob_rows(logits.log_softmax(dim=-1), nxt, seq.params.prompt_logprobs or 0)
            prompt_rows.append((seq, first, rows))
        if inp.sample_seqs:
            logits = self.model.compute_logits(hidden.index_select(0, inp.logits_indices))
            batch = SamplingBatch.build(inp.sample_seqs, self.vocab_size, logits.device)
            sampled = self.sampler(logits, batch)
        else:
            sampled = SamplerOutput([], [])
        return StepResult(sampled, inp.sample_seqs, prompt_rows)
