"""CUDA graphs for decode steps: the whole forward (embedding to logits) replayed from one launch.

At batch 1 an 8B forward is ~600 kernel launches; from Python each costs ~10 us, inside a graph under 1 us. A
graph is captured for a set of batch sizes; a step of b decodes runs the smallest captured size >= b, with
the padding rows pointed at no cache slot (slot -1: nothing stored) and a context of one token.

What runs between two replays is kept small, because at batch 1 each small operation there costs the step ~3-4 us
(bench/profile_decode.py, tenth session). So the graph takes the greedy tokens (the argmax of its logits, into
`tokens`) and gathers its own input tokens: each row's either from the host's copy or from `tokens`, where the step
before left its sampled tokens (async scheduling). Up to `COPIES_IN_GRAPH_MAX_BATCH` rows (opt-in), where a step
is shortest and those operations weigh most, the graph also holds the copies of its per-row inputs and lengths from
pinned host memory and the greedy tokens' read-back into pinned memory: two graphs for each such batch size, one per
set of host buffers, used in turn (the host fills one set while the other's step may still be queued). What stays
outside is the block tables' copy, whose width varies (plus a copy of the step before's sampled tokens when they
are not already where the graph reads them).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from ember.attention import AttentionBackend, AttentionMetadata
from ember.engine.workers import drained
from ember.model.llama import LlamaForCausalLM
from ember.sampling.sampler import argmax_rows

logger = logging.getLogger(__name__)

# The largest batch whose graphs hold their copies (each such size captures two graphs). Off by default (0: the input
# copies and the tokens' read-back run as stream operations between replays) until measured on a GPU; e.g. 8.
COPIES_IN_GRAPH_MAX_BATCH = int(os.environ.get("EMBER_GRAPH_COPIES_MAX_BATCH", "0"))
REWIND_TIMEOUT_S = 30.0


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


# Rows of `DecodeGraphs.packed`: one int64 buffer, so that one copy brings a step's per-row inputs.
_IDS, _POSITIONS, _SLOTS, _GATHER, _TOKENS = range(5)
_HOST_ROWS = 4  # the rows the host writes; the graph writes _TOKENS


def gather_index(size: int, width: int, where: tuple[list[int], list[int]] | None) -> list[int]:
    """Where each of `size` input rows takes its token in the flattened `packed` buffer (rows of `width`): its own
    host-copied id, or, for rows[i] in `where` = (rows, src), the token the step before sampled at src[i]."""
    index = list(range(size))
    if where is not None:
        for row, src in zip(*where, strict=True):
            index[row] = _TOKENS * width + src
    return index


class DecodeGraphs:
    """`with_logits=False` (tensor-parallel workers, which do not sample): the graphs end at the hidden states.

    Without `capture()` (the CPU, in tests) `run` executes the same forward eagerly."""

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
        self.packed = torch.zeros(5, n, dtype=torch.long, device=device)
        self.positions, self.slot_mapping = self.packed[_POSITIONS], self.packed[_SLOTS]
        self.tokens = self.packed[_TOKENS]  # the greedy tokens of the last replay, or tokens placed for the next
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        # Pinned staging buffers, allocated once: pinning memory per step costs more than the copy itself. Two
        # sets used in turn: with async scheduling the host fills step n+1's while step n's copies may still be
        # queued; step n-1's have completed (its tokens were read back).
        pin = device.type == "cuda"

        def host(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            t = torch.zeros(*shape, dtype=dtype)
            return t.pin_memory() if pin else t

        self._staging = [(host(_HOST_ROWS, n, dtype=torch.long), host(n, dtype=torch.int32),
                          host(n, max_blocks_per_seq, dtype=torch.int32)) for _ in range(2)]
        for rows, lens, _ in self._staging:  # what a graph holding its copies reads before any run: padding rows
            rows[_SLOTS] = -1
            lens.fill_(1)
        self._host_tokens = [host(n, dtype=torch.long) for _ in range(2)]
        self.turn = 1  # the staging set the last run filled
        # The sizes whose graphs hold their copies (none uncaptured: the CPU).
        self.holds_copies = {s for s in self.sizes if s <= COPIES_IN_GRAPH_MAX_BATCH} if pin else set()
        # The replay's greedy tokens on the host, once it has run: the graph copied them there itself. None when
        # the last run did not (its graph holds no copies, or it has no logits).
        self.host_tokens: torch.Tensor | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # the graphs of staging set 0 (or of both)
        self._twins: dict[int, torch.cuda.CUDAGraph] = {}  # of staging set 1, when the graphs hold the copies
        self.outputs: dict[int, torch.Tensor] = {}  # logits, or hidden states without them
        self._twin_outputs: dict[int, torch.Tensor] = {}  # the twins' (each graph writes its own)
        self.capture_s = 0.0

    def _meta(self, b: int, seq_lens: list[int] | None) -> AttentionMetadata:
        """`seq_lens`: the host's lengths, which the torch backend needs; captured graphs are replayed for any
        lengths, and the Triton backend reads them on the device."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], query_start_loc=self.query_start_loc[:b + 1],
            seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b], max_query_len=1,
            max_seq_len=self.block_tables.shape[1] * self.kv_caches[0][0].shape[1],
            query_lens_cpu=[1] * b, seq_lens_cpu=seq_lens or [1] * b)

    def _copy_inputs(self, turn: int, size: int) -> None:
        """The host's rows of `packed` and the lengths, from staging set `turn`. Copies, never kernels: attention may
        read the lengths and block tables before its PDL wait (`ember.kernels.pdl`)."""
        host, host_lens, _ = self._staging[turn]
        self.packed[:_HOST_ROWS].copy_(host, non_blocking=True)
        self.seq_lens[:size].copy_(host_lens[:size], non_blocking=True)

    def _step_with_copies(self, turn: int, size: int, seq_lens: list[int] | None = None) -> torch.Tensor:
        """What a graph holding its copies records: inputs in, the forward, the greedy tokens out."""
        self._copy_inputs(turn, size)
        out = self._forward(size, seq_lens)
        if self.with_logits:
            self._host_tokens[turn][:size].copy_(self.tokens[:size], non_blocking=True)
        return out

    def _forward(self, b: int, seq_lens: list[int] | None = None) -> torch.Tensor:
        input_ids = self.packed.view(-1).index_select(0, self.packed[_GATHER, :b])
        hidden = self.model(input_ids, self.positions[:b], self.kv_caches, self._meta(b, seq_lens), self.attn)
        if not self.with_logits:
            return hidden
        logits = self.model.compute_logits(hidden)
        # Taken on every replay (one read of the logits: ~14 µs of kernels at batch 1 on an H100); a step that
        # samples ignores it.
        self.tokens[:b].copy_(argmax_rows(logits))
        return logits

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
                if b in self.holds_copies:
                    for turn in (0, 1):
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g, pool=pool, stream=stream):
                            self.outputs_of(turn, b)[b] = self._step_with_copies(turn, b)
                        self._graphs_of(turn, b)[b] = g
                    continue
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=stream):
                    self.outputs[b] = self._forward(b)
                self.graphs[b] = g
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t
        twins = f"; two each up to {max(self.holds_copies)}, holding their copies" if self.holds_copies else ""
        logger.info("captured CUDA graphs for %d decode batch sizes (up to %d%s) in %.1f s", len(self.sizes),
                    self.max_batch, twins, self.capture_s)

    def padded_size(self, b: int) -> int | None:
        for s in self.sizes:
            if s >= b:
                return s
        return None

    def _place_tokens(self, tokens: torch.Tensor, where: tuple[list[int], list[int]]
                      ) -> tuple[list[int], list[int]]:
        """Put the tokens that `where` takes into `self.tokens`, unless the last replay left them there; returns
        `where` with its sources as indices into `self.tokens`."""
        if tokens.data_ptr() == self.tokens.data_ptr():
            return where
        if tokens.numel() <= self.tokens.shape[0]:  # the step before ran eagerly, or sampled, or was broadcast
            self.tokens[:tokens.numel()].copy_(tokens)
            return where
        rows, src = where  # more tokens than fit: only the ones needed
        self.tokens[:len(src)].copy_(tokens[torch.tensor(src).to(tokens.device, non_blocking=True)])
        return rows, list(range(len(src)))

    def _graphs_of(self, turn: int, size: int) -> dict[int, torch.cuda.CUDAGraph]:
        """Where the graph that staging set `turn` runs for `size` rows is kept."""
        return self._twins if turn and size in self.holds_copies else self.graphs

    def outputs_of(self, turn: int, size: int) -> dict[int, torch.Tensor]:
        """Where the graph of staging set `turn` for `size` rows leaves its outputs."""
        return self._twin_outputs if turn and size in self.holds_copies else self.outputs

    def rewind(self, turn: int) -> None:
        """After a failed step (`turn`: the `turn` before it): if its run had begun, wait for what it queued, then
        hand its staging set to the next run. The other set belongs to the step still in flight, whose tokens a
        graph holding its copies has yet to leave on the host."""
        if self.turn == turn:  # it failed before its run: it filled no staging set
            return
        # Bounded: a tensor-parallel step whose worker died never finishes.
        if self.packed.device.type == "cuda" and not drained(torch.cuda.current_stream(self.packed.device),
                                                             REWIND_TIMEOUT_S, 0.001):
            raise RuntimeError(f"a failed decode step's queued work did not finish within {REWIND_TIMEOUT_S:g} s")
        self.turn = turn

    def run(self, batch: DecodeBatch, where: tuple[list[int], list[int]] | None = None,
            tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the graph for this decode batch; returns logits [b, vocab] (or hidden states), a view of the
        graph's output, and with logits leaves the rows' greedy tokens in `self.tokens[:b]`.

        `where` = (rows, src): input rows whose token is still on the device (async scheduling), row rows[i]
        taking `tokens[src[i]]`.
        """
        b, tables = len(batch.input_ids), batch.block_tables
        size = self.padded_size(b)
        assert size is not None
        if where is not None:
            assert tokens is not None, "input tokens still on the device, without the tensor that holds them"
            where = self._place_tokens(tokens, where)
        width = max(len(t) for t in tables)
        turn = self.turn = 1 - self.turn
        host, host_lens, host_bt = self._staging[turn]
        h, lens, bt = host.numpy(), host_lens.numpy(), host_bt.numpy()
        # Padding rows store nothing (slot -1) and attend to one token.
        h[_IDS, :b], h[_POSITIONS, :b], h[_SLOTS, :b] = batch.input_ids, batch.positions, batch.slots
        h[_IDS, b:size], h[_POSITIONS, b:size], h[_SLOTS, b:size] = 0, 0, -1
        h[_GATHER, :size] = gather_index(size, self.packed.shape[1], where)
        lens[:b], lens[b:size] = batch.seq_lens, 1
        for i, t in enumerate(tables):
            bt[i, :len(t)] = t
        # Only the columns in use. One row (batch 1) is one contiguous copy; for more rows torch stages the strided
        # copy through a temporary and a copy kernel. Either way it completes before the replay's first kernel,
        # so attention may read the tables before its PDL wait (`ember.kernels.pdl`).
        self.block_tables[:b, :width].copy_(host_bt[:b, :width], non_blocking=True)
        self.host_tokens = None
        graph = self._graphs_of(turn, size).get(size)
        outputs = self.outputs_of(turn, size)
        if graph is None:
            self._copy_inputs(turn, size)
            outputs[size] = self._forward(size, list(batch.seq_lens) + [1] * (size - b))
        elif size in self.holds_copies:
            graph.replay()
            if self.with_logits:
                self.host_tokens = self._host_tokens[turn][:b]
        else:
            self._copy_inputs(turn, size)
            graph.replay()
        return outputs[size][:b]
