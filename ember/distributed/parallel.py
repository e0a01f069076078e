"""The tensor-parallel group one process belongs to, and the few collectives the engine needs.

Megatron-style sharding: the q/k/v and gate/up projections are split by output rows (whole attention heads, slices
of the MLP), o_proj and down_proj by input columns, so each layer needs one all-reduce after each of those two.
Embeddings, norms and the lm_head are replicated. The process groups are objects held here, not torch's global
default group, so that several engines (tests) can come and go in one process.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import pickle
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ember.distributed import symmetric
from ember.distributed.symmetric import SymmetricAllReduce

logger = logging.getLogger(__name__)

# How long a collective of the model (an all-reduce inside a forward pass) may wait for the other ranks before
# raising (EMBER_TP_TIMEOUT_S overrides it): a stuck rank fails the engine instead of hanging it (torch's default
# is 30 min). Every rank enters a step's forward right after the driver sends it, so waits here are short unless
# something is wrong.
MODEL_TIMEOUT_S = 120.0
# The control group's waits are open-ended by nature: an idle worker waits for the next step as long as the server
# is idle, and at startup for the slowest rank's load. A dead driver is noticed by the workers' own watchdog, and a
# dead worker by the driver's next send (a closed connection fails at once).
CONTROL_TIMEOUT = datetime.timedelta(days=365)


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: Any = None  # the all-reduces of the model (NCCL between GPUs, gloo on CPUs)
    control: Any = None  # gloo, between the CPUs: the driver's step inputs to the workers
    store: Any = None  # the rendezvous (rank 0 serves it): kept alive as long as the groups
    symm: SymmetricAllReduce | None = None  # small all-reduces between GPUs (`ember.distributed.symmetric`)

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def shard(self, n: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's share of `n` rows, heads or columns."""
        if n % self.size:
            raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size {self.size}")
        k = n // self.size
        return self.rank * k, k

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks; use the returned tensor (NCCL and gloo sum in place, the one-shot kernel of
        small messages into a new tensor)."""
        if self.size > 1:
            if self.symm is not None and self.symm.fits(x):
                return self.symm.all_reduce(x)
            self.group.allreduce([x]).wait()
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x`, in place on every rank, queued on the device like the all-reduces (the tokens the
        driver sampled, which the workers' next inputs may need before anyone has read them back)."""
        if self.size > 1:
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            self.group.broadcast([x], opts).wait()
        return x

    def shutdown(self) -> None:
        """Tear the model group down now, after the workers have exited and the CUDA graphs that captured its
        collectives are gone (left to the interpreter's exit, NCCL's teardown hung with graphs alive)."""
        if self.size > 1:
            if self.symm is not None:
                self.symm.close()
            self.group.shutdown()

    def agree_min(self, value: int) -> int:
        """The smallest of the ranks' `value`s, on every rank (e.g. KV blocks each GPU has room for)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.control.allreduce([t], opts).wait()
        return int(t.item())

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's `obj`, on every rank (pickled over the control group)."""
        if self.size == 1:
            return obj
        if self.rank == 0:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            length = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            length = torch.zeros(1, dtype=torch.int64)
        self.control.broadcast(length, 0).wait()
        if self.rank != 0:
            payload = torch.empty(int(length.item()), dtype=torch.uint8)
        self.control.broadcast(payload, 0).wait()
        return obj if self.rank == 0 else pickle.loads(payload.numpy().tobytes())


def cpu_threads_per_rank(size: int) -> int | None:
    """Intra-op threads for one of `size` ranks sharing this machine's CPUs: its share of the cores. Each rank's
    pool would otherwise take every core, and the pools would spin against each other at every all-reduce (three
    ranks on two cores: twice as slow a step). None where OMP_NUM_THREADS already says."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // size)


def connect(rank: int, size: int, port: int, device: torch.device, store: Any = None,
            model_timeout_s: float | None = None) -> TensorParallel:
    """Join the group of `size` processes that meet at 127.0.0.1:`port`, whose rendezvous rank 0 serves (`store`:
    the driver's, created before the workers so that the port is never free for someone else to take)."""
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, size, rank == 0, timeout=CONTROL_TIMEOUT)
    control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, size, CONTROL_TIMEOUT)
    if model_timeout_s is None:  # the environment reaches spawned workers too
        model_timeout_s = float(os.environ.get("EMBER_TP_TIMEOUT_S", MODEL_TIMEOUT_S))
    timeout = datetime.timedelta(seconds=model_timeout_s)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = dist.ProcessGroupNCCL(dist.PrefixStore("model", store), rank, size, options)
    else:
        group = dist.ProcessGroupGloo(dist.PrefixStore("model", store), rank, size, timeout)
    tp = TensorParallel(rank, size, group, control, store)
    symm = _symmetric_all_reduce(tp, port, device, timeout) if device.type == "cuda" else None
    return tp if symm is None else dataclasses.replace(tp, symm=symm)


def _symmetric_all_reduce(tp: TensorParallel, port: int, device: torch.device,
                          timeout: datetime.timedelta) -> SymmetricAllReduce | None:
    """The group's one-shot all-reduce, or None to stay on NCCL. Every rank must take the same path (one waiting
    in a kernel the others never run would hang), so the ranks agree after each step that can fail on one of
    them; the rendezvous's own waits go through a store client bounded by the model timeout."""
    if tp.agree_min(int(symmetric.usable(device, tp.size))) == 0:
        return None
    symm = None
    try:
        client = dist.TCPStore("127.0.0.1", port, tp.size, False, timeout=timeout)
        symm = SymmetricAllReduce.prepare(tp.group, tp.control, dist.PrefixStore("symm", client), tp.rank,
                                          tp.size, device, f"ember-tp-{port}")
    except Exception:
        logger.warning("symmetric-memory all-reduce unavailable; all-reduces stay on NCCL", exc_info=True)
    if tp.agree_min(int(symm is not None)) == 0:
        if symm is not None:
            symm.close()
        return None
    assert symm is not None
    try:
        symm.rendezvous()
        ok = True
    except Exception:
        logger.warning("symmetric-memory rendezvous failed; all-reduces stay on NCCL", exc_info=True)
        ok = False
    if tp.agree_min(int(ok)) == 0:
        symm.close()
        return None
    return symm


def rendezvous(size: int) -> Any:
    """The driver's rendezvous store on a free port of 127.0.0.1 (its `.port`), before any worker exists."""
    return dist.TCPStore("127.0.0.1", 0, size, True, timeout=CONTROL_TIMEOUT, wait_for_workers=False)
