"""CUDA graphs for decode steps: the whole forward (embedding to logits) replayed from one launch.

At batch 1 an 8B forward is ~600 kernel launches; from Python each costs ~10 us, inside a graph under 1 us. A
graph is captured for a set of batch sizes; a step of b decodes runs the smallest captured size >= b, with
the padding rows pointed at no cache slot (slot -1: nothing stored) and a context of one token.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ember.attention import AttentionBackend, AttentionMetadata
from ember.model.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from ember.engine.model_runner import PendingInputs

logger = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 1, 16))
    return sorted({s for s in sizes if s <= max_batch} | {max_batch})


@dataclass
class DecodeBatch:
    """A step of decodes as plain lists (picklable: tensor-parallel workers replay the same graph)."""

    input_ids: list[int]  # 0 where the token is still on the device (async scheduling)
    positions: list[int]
    slots: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]


class DecodeGraphs:
    """`with_logits=False` (tensor-parallel workers, which do not sample): the graphs end at the hidden states."""

    def __init__(self, model: LlamaForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 attn: AttentionBackend, max_batch: int, max_blocks_per_seq: int, device: torch.device,
                 with_logits: bool = True) -> None:
        self.model = model
        self.with_logits = with_logits
        self.kv_caches = kv_caches
        self.attn = attn
        self.sizes = capture_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        # Pinned staging buffers, allocated once: pinning memory per step costs more than the copy itself. Two
        # sets used in turn: with async scheduling the host fills step n+1's while step n's copies may still be
        # queued; step n-1's have completed (its tokens were read back).
        self._staging = [(torch.zeros(4, n, dtype=torch.long).pin_memory(),
                          torch.zeros(n, max_blocks_per_seq, dtype=torch.int32).pin_memory()) for _ in range(2)]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # logits, or hidden states without them
        self.capture_s = 0.0

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], query_start_loc=self.query_start_loc[:b + 1],
            seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b], max_query_len=1,
            max_seq_len=self.block_tables.shape[1] * self.kv_caches[0][0].shape[1],
            query_lens_cpu=[1] * b, seq_lens_cpu=[1] * b)

    def _forward(self, b: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:b], self.positions[:b], self.kv_caches, self._meta(b), self.attn)
        return self.model.compute_logits(hidden) if self.with_logits else hidden

    @torch.inference_mode()
    def capture(self) -> None:
        t = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # Largest first, so smaller graphs reuse the pool's blocks.
            for b in reversed(self.sizes):
                for _ in range(2):  # compile Triton kernels and settle allocations outside the capture
                    self._forward(b)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=stream):
                    self.outputs[b] = self._forward(b)
                self.graphs[b] = g
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t
        logger.info("captured CUDA graphs for %d decode batch sizes (up to %d) in %.1f s", len(self.sizes),
                    self.max_batch, self.capture_s)

    def padded_size(self, b: int) -> int | None:
        for s in self.sizes:
            if s >= b:
                return s
        return None

    def run(self, batch: DecodeBatch, pending: PendingInputs | None = None) -> torch.Tensor:
        """Replay the graph for this decode batch; returns logits [b, vocab] (or hidden states), a view of the
        graph's output.

        `pending`: inputs still on the device (async scheduling), placed after the host's inputs are copied.
        """
        b, tables = len(batch.input_ids), batch.block_tables
        size = self.padded_size(b)
        assert size is not None
        width = max(len(t) for t in tables)
        self._staging.reverse()
        host, host_bt = self._staging[0]
        h, bt = host.numpy(), host_bt.numpy()
        # Padding rows store nothing (slot -1) and attend to one token.
        h[0, :b], h[1, :b], h[2, :b], h[3, :b] = batch.input_ids, batch.positions, batch.slots, batch.seq_lens
        h[0, b:size], h[1, b:size], h[2, b:size], h[3, b:size] = 0, 0, -1, 1
        for i, t in enumerate(tables):
            bt[i, :len(t)] = t
        # Copies, never kernels: attention may read the lengths and block tables before its PDL wait
        # (`ember.kernels.pdl`).
        self.input_ids[:size].copy_(host[0, :size], non_blocking=True)
        self.positions[:size].copy_(host[1, :size], non_blocking=True)
        self.slot_mapping[:size].copy_(host[2, :size], non_blocking=True)
        self.seq_lens[:size].copy_(host[3, :size], non_blocking=True)
        self.block_tables[:b, :width].copy_(host_bt[:b, :width], non_blocking=True)
        if pending is not None:
            pending.apply(self.input_ids)
        self.graphs[size].replay()
        return self.outputs[size][:b]
