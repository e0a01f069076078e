"""Packs a scheduled step into flat tensors, runs the model once, and samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.attention import AttentionBackend, AttentionMetadata
from ember.engine.cuda_graphs import DecodeGraphs
from ember.engine.scheduler import SchedulerOutput
from ember.engine.sequence import Sequence
from ember.model.llama import LlamaForCausalLM
from ember.sampling.sampler import LogprobRow, Sampler, SamplerOutput, SamplingBatch, logprob_rows


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
class StepResult:
    sampled: SamplerOutput
    sample_seqs: list[Sequence]
    # (sequence, first position, rows): row j is the logprob of prompt token first + j + 1.
    prompt_logprobs: list[tuple[Sequence, int, list[LogprobRow]]]


def cache_slot(block_table: list[int], position: int, block_size: int) -> int:
    """The flat KV-cache slot that holds a sequence's token at `position`."""
    return block_table[position // block_size] * block_size + position % block_size


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 block_size: int, device: torch.device, attn: AttentionBackend, sampler: Sampler) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.attn = attn
        self.sampler = sampler
        self.vocab_size = model.config.vocab_size
        self.graphs: DecodeGraphs | None = None

    def _tensor(self, data: list[int], dtype: torch.dtype) -> torch.Tensor:
        # Built straight on the device: pinning a fresh host buffer each step costs more than it saves.
        return torch.tensor(data, dtype=dtype, device=self.device)

    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        q_lens: list[int] = []
        logits_idx: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_lp: list[tuple[Sequence, int, int, int]] = []
        max_blocks = max(len(s.seq.block_table) for s in sched.scheduled)
        tables: list[list[int]] = []
        for item in sched.scheduled:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            row0 = len(input_ids)
            input_ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            bt = seq.block_table
            slots.extend(cache_slot(bt, p, bs) for p in range(start, start + n))
            qsl.append(qsl[-1] + n)
            q_lens.append(n)
            seq_lens.append(start + n)
            tables.append(bt + [0] * (max_blocks - len(bt)))
            if item.samples:
                logits_idx.append(row0 + n - 1)
                sample_seqs.append(seq)
            if seq.request.wants_prompt_logprobs(seq) and start < seq.num_prompt_tokens:
                prompt_lp.append((seq, start, row0, min(n, seq.num_prompt_tokens - start)))
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64),
            query_start_loc=self._tensor(qsl, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            block_tables=self._tensor([x for t in tables for x in t], torch.int32).view(len(tables), max_blocks),
            max_query_len=max(q_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=q_lens,
            seq_lens_cpu=seq_lens,
        )
        return StepInputs(self._tensor(input_ids, torch.int64), self._tensor(positions, torch.int64), meta,
                          self._tensor(logits_idx, torch.int64), sample_seqs, prompt_lp)

    def enable_cuda_graphs(self, max_batch: int, max_blocks_per_seq: int) -> float:
        """Capture decode graphs; returns the capture time in seconds."""
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.attn, max_batch, max_blocks_per_seq,
                                   self.device)
        self.graphs.capture()
        return self.graphs.capture_s

    def _graph_decode(self, sched: SchedulerOutput) -> StepResult | None:
        """A step of pure decodes (no prompt logprobs) that fits a captured graph runs by replay."""
        g = self.graphs
        items = sched.scheduled
        if g is None or len(items) > g.max_batch or not all(i.num_new_tokens == 1 and i.samples for i in items):
            return None
        if any(i.seq.request.wants_prompt_logprobs(i.seq) for i in items):
            return None
        bs = self.block_size
        seqs = [i.seq for i in items]
        pos = [s.num_computed_tokens for s in seqs]
        logits = g.run([s.token_ids[p] for s, p in zip(seqs, pos, strict=True)], pos,
                       [cache_slot(s.block_table, p, bs) for s, p in zip(seqs, pos, strict=True)],
                       [p + 1 for p in pos], [s.block_table for s in seqs])
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
