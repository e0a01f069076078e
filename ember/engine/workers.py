"""Tensor-parallel worker processes: ranks 1..N-1, each holding its shards of the model and its KV heads.

The engine process is rank 0 (the driver): it schedules, samples and detokenizes; each step it sends the
workers the step's flat batch (`WorkerStep`) over a gloo group, and every rank runs the same forward pass (eager,
or the replay of the same captured decode graph), whose all-reduces combine the shards. With async scheduling the
driver also broadcasts the tokens it samples, on the device, since a worker's next inputs may include them before
the driver has read them back. Workers are spawned (fresh interpreters: CUDA cannot be forked), meet the driver at
a TCP rendezvous on 127.0.0.1, report their load through a pipe, then loop until told to stop.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch

from ember.config import EngineConfig
from ember.distributed.parallel import MODEL_TIMEOUT_S, TensorParallel, connect, cpu_threads_per_rank, rendezvous

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0  # a fresh interpreter importing torch on a busy machine
READY_TIMEOUT_S = 1800.0  # loading a large model from a slow disk takes minutes
STOP_TIMEOUT_S = 10.0


class WorkerGroup:
    """The driver's handle on its workers."""

    def __init__(self, config: EngineConfig) -> None:
        self.size = config.tensor_parallel_size
        self.device = _device(config, 0)
        if self.device.type == "cuda" and self.device.index is not None:
            raise ValueError(f"--device {config.device} with --tensor-parallel-size {self.size}: rank r uses GPU r; "
                             "choose the GPUs with CUDA_VISIBLE_DEVICES and give --device cuda")
        if self.device.type == "cuda" and torch.cuda.device_count() < self.size:
            raise ValueError(f"--tensor-parallel-size {self.size} needs {self.size} GPUs, one a rank; "
                             f"{torch.cuda.device_count()} visible")
        self.store = rendezvous(self.size)
        self.port = self.store.port
        self.tp: TensorParallel | None = None
        self.threads_before: int | None = None  # the driver's own thread count, given back by `stop`
        self.running = False  # in their step loop: a stop message reaches them
        self.stopped = False
        self.closed = False  # the model group torn down too (`_shut_down_tensor_parallel`)
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        for rank in range(1, self.size):
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=worker_main, args=(config, rank, self.size, self.port, child),
                               name=f"ember-tp-worker-{rank}", daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)

    def connect_driver(self, timeout_s: float = START_TIMEOUT_S) -> TensorParallel:
        """Join the workers' group as rank 0, once each has started (a worker that dies on its way, e.g. a script
        without `if __name__ == "__main__":` that spawn re-runs, is reported instead of awaited)."""
        self._wait_for("started", "while starting", timeout_s)
        threads = cpu_threads_per_rank(self.size) if self.device.type == "cpu" else None
        if threads is not None:
            self.threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)
        self.tp = connect(0, self.size, self.port, self.device, store=self.store)
        return self.tp

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until every worker has loaded its shards (raises the first worker's error, or death, instead); then
        all ranks go on together to size the KV cache, whose collectives would time out on a rank that loads
        much slower than the others."""
        self._wait_for("ready", "while loading", timeout_s)
        assert self.tp is not None
        self.tp.broadcast_object(("start", None))

    def _wait_for(self, what: str, during: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns, strict=True), start=1):
            while not conn.poll(0.1):
                if not proc.is_alive():
                    raise RuntimeError(f"tensor-parallel worker {rank} exited (code {proc.exitcode}) {during}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"tensor-parallel worker {rank} did not report {what!r} within "
                                       f"{timeout_s:.0f} s")
            try:
                kind, detail = conn.recv()
            except EOFError:  # the worker closed its end without a word: it is exiting
                proc.join(5.0)
                raise RuntimeError(f"tensor-parallel worker {rank} exited (code {proc.exitcode}) {during}; see its "
                                   "output above") from None
            if kind != what:
                raise RuntimeError(f"tensor-parallel worker {rank} failed {during}: {detail}")

    def all_alive(self) -> bool:
        return all(proc.is_alive() for proc in self.procs)

    def mark_running(self) -> None:
        self.running = True
        if self.tp is not None and self.tp.symm is not None:
            timeout = float(os.environ.get("EMBER_TP_TIMEOUT_S", MODEL_TIMEOUT_S))
            threading.Thread(target=self.watch_liveness, args=(list(self.procs), timeout),
                             name="ember-tp-liveness", daemon=True).start()

    def watch_liveness(self, procs: list[Any], timeout_s: float, poll_s: float = 1.0,
                       stuck: Callable[[], bool] | None = None) -> None:
        """Exit this process if one of `procs` (the workers) has died and, `timeout_s` later, the group is not
        torn down and this GPU is still busy (`stuck`: default, the engine's stream does not drain in 5 s).

        With symmetric-memory all-reduces a step whose peer is gone never ends (the kernel waits for the other
        ranks without a timeout, where NCCL's watchdog aborts the process after the model timeout), and neither
        does the teardown after it. A death while idle leaves the GPU free: the next step fails at once instead
        (its send to the dead worker), and the process lives on."""
        stuck = stuck or (lambda: not drained(torch.cuda.default_stream(self.device), 5.0, 0.05))
        while not self.closed:
            dead = [(rank, proc.exitcode) for rank, proc in enumerate(procs, start=1) if not proc.is_alive()]
            if dead:
                deadline = time.monotonic() + timeout_s
                while not self.closed and time.monotonic() < deadline:
                    time.sleep(min(poll_s, 0.5))
                if self.closed or not stuck():
                    return
                logger.critical("tensor-parallel worker %d is gone (exit code %s) and this GPU is still waiting on "
                                "it %.0f s later: exiting", *dead[0], timeout_s)
                sys.stderr.flush()
                os._exit(1)
            time.sleep(poll_s)

    def stop(self) -> None:
        """Tell the workers to exit (or terminate them); idempotent."""
        self.stopped = True
        if self.running and self.tp is not None:
            self.running = False
            try:
                self.tp.broadcast_object(("stop", None))
            except Exception:  # a worker already gone: terminated below
                logger.debug("stop message to tensor-parallel workers failed", exc_info=True)
            for proc in self.procs:
                proc.join(STOP_TIMEOUT_S)
        for proc in self.procs:  # not in their loop (a failed start), or not listening
            if proc.is_alive():
                proc.terminate()
                proc.join(STOP_TIMEOUT_S)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
        if self.threads_before is not None:
            torch.set_num_threads(self.threads_before)
            self.threads_before = None


def drained(stream: torch.cuda.Stream, timeout_s: float, poll_s: float) -> bool:
    """Whether the work queued on `stream` so far finishes within `timeout_s` (polled: a wait that may never end,
    on a rank that is gone, must stay bounded)."""
    marker = torch.cuda.Event()
    marker.record(stream)
    deadline = time.monotonic() + timeout_s
    while not marker.query():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def _device(config: EngineConfig, rank: int) -> torch.device:
    from ember.engine.llm_engine import resolve_device

    return resolve_device(config.device, rank)


def worker_main(config: EngineConfig, rank: int, size: int, port: int, conn: Connection) -> None:
    """A worker process: connect, load this rank's shards, size the KV cache with the others, then run the forward
    of every step the driver sends until it sends "stop"."""
    from ember.attention import get_attention_backend
    from ember.engine.kv_cache import allocate_kv_cache, kv_cache_dtype
    from ember.engine.llm_engine import decode_graph_shape, load_model, num_kv_blocks
    from ember.engine.model_runner import ModelRunner

    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s %(levelname)s tp-worker-{rank} %(name)s: "
                        "%(message)s")
    # Ctrl-C in a terminal reaches the whole process group: the driver decides when its workers stop (after
    # draining requests), by a stop message; if it dies instead, the watchdog below ends the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # An engine process ignores SIGTERM (the server stops it), and its children inherit that: the driver's
    # `terminate()` of a worker that does not stop must still work.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    exit_with_parent()
    try:
        device = _device(config, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        elif (threads := cpu_threads_per_rank(size)) is not None:
            torch.set_num_threads(threads)
        conn.send(("started", None))
        tp = connect(rank, size, port, device)
        loaded = load_model(config, tp)
    except BaseException as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        conn.close()
        return
    conn.send(("ready", None))
    conn.close()
    if tp.broadcast_object()[0] != "start":  # the driver gave up before sizing the cache
        return
    kv_dtype = kv_cache_dtype(config.kv_cache_dtype, loaded.dtype, device)
    num_blocks = num_kv_blocks(config, loaded, config.block_size, kv_dtype, tp)
    kv_caches = allocate_kv_cache(loaded.arch, num_blocks, config.block_size, kv_dtype, device, tp.size)
    runner = ModelRunner(loaded.model, kv_caches, config.block_size, device,
                         get_attention_backend(config.attention_backend, device), None, tp)
    shape = decode_graph_shape(config, device, runner.attn, loaded.max_model_len)
    if shape is not None:  # as the driver does, at the same time: the graphs hold the all-reduces
        runner.enable_cuda_graphs(*shape)
    while True:
        kind, step = tp.broadcast_object()
        if kind == "stop":
            # Gone at once: NCCL's teardown in an exiting interpreter waits for the other ranks' (or hangs on
            # captured graphs), and nothing here needs saving.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        runner.forward_on_worker(step)


def exit_with_parent() -> None:
    """End this process (a tensor-parallel worker, the engine process) when its parent ends, however it ends (a
    killed parent sends no stop message, and an idle child waits for one without a timeout)."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(0)

    threading.Thread(target=watch, name="ember-parent-watchdog", daemon=True).start()
