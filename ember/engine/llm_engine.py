"""The synchronous engine: owns the model, the KV cache, the scheduler; `step()` advances every request."""

from __future__ import annotations

import logging
import os
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.attention import AttentionBackend, get_attention_backend
from ember.config import EngineConfig
from ember.distributed.parallel import TensorParallel
from ember.engine.block_manager import BlockManager
from ember.engine.detokenizer import Detokenizer, find_stop_string, releasable_text
from ember.engine.errors import RequestValidationError
from ember.engine.kv_cache import CPU_DEFAULT_KV_BYTES, allocate_kv_cache, bytes_per_block, kv_cache_dtype
from ember.engine.model_runner import InflightStep, ModelRunner, StepResult
from ember.engine.scheduler import Scheduler, SchedulerOutput
from ember.engine.sequence import Request, Sequence
from ember.engine.workers import WorkerGroup, drained
from ember.kernels.startup import prepare_triton_in_background
from ember.model.config import ModelArchConfig
from ember.model.llama import LlamaForCausalLM
from ember.model.loader import build_model, embedded_gguf_path, resolve_model
from ember.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from ember.sampling.sampler import LogprobRow, Sampler
from ember.sampling_params import SamplingParams, SamplingParamsError
from ember.tokenizer import Tokenizer, load_chat_template

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """`rank`: a tensor-parallel rank, which takes the GPU of that index."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and rank > 0:
        device = torch.device("cuda", rank)
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # CPU matmuls are fastest (and match the HF reference exactly) in fp32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto, float32, bfloat16 or float16")
    return _DTYPES[name]


@dataclass
class LoadTimings:
    resolve_s: float = 0.0
    tokenizer_s: float = 0.0
    weights_s: float = 0.0
    kv_cache_s: float = 0.0
    cuda_graphs_s: float = 0.0
    warm_up_s: float = 0.0


@dataclass
class LoadedModel:
    """Weights, tokenizer and what describes them: the part of an engine that is expensive to build."""

    name: str
    arch: ModelArchConfig
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    timings: LoadTimings
    quantization: str | None = None  # what the projections were turned into (see effective_quantization)


def use_compile_cache(path: str) -> None:
    """Keep Triton's compiled kernels in `path`: on a volume that outlives the machine, a new replica skips the
    JIT compilation of the warm-up and graph capture (seconds of its cold start). Must run before the first
    kernel compiles; Triton reads the variable when it compiles."""
    cache = Path(path).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = str(cache)


def load_model(config: EngineConfig, tp: TensorParallel | None = None) -> LoadedModel:
    """Weights (this rank's shards under tensor parallelism), tokenizer and their description."""
    tp = tp or TensorParallel()
    timings = LoadTimings()
    t0 = time.perf_counter()
    device = resolve_device(config.device, tp.rank)
    dtype = resolve_dtype(config.dtype, device)
    source = resolve_model(config)
    arch = ModelArchConfig.from_hf(source.hf_config)
    max_model_len = _max_model_len(arch, config.max_model_len)
    t1 = time.perf_counter()
    timings.resolve_s = t1 - t0

    tok_dir = config.tokenizer or source.tokenizer_dir
    gguf_tok = source.gguf_file if tok_dir is None else None
    if gguf_tok is None and tok_dir is None:  # dummy weights without tokenizer files
        gguf_tok = embedded_gguf_path()
    tokenizer = Tokenizer.load(tok_dir or "", gguf_tok, set(arch.eos_token_ids),
                               load_chat_template(config.chat_template))
    t2 = time.perf_counter()
    timings.tokenizer_s = t2 - t1

    triton_startup = prepare_triton_in_background() if device.type == "cuda" else None
    torch.manual_seed(config.seed)
    quantization = effective_quantization(config.quantization, arch, device)
    model = build_model(source, arch, dtype, device, max_model_len, config.seed, tp, quantization)
    if triton_startup is not None:
        triton_startup.join()  # done by now, normally: the weight reads take longer
    timings.weights_s = time.perf_counter() - t2
    return LoadedModel(source.name, arch, model, tokenizer, device, dtype, max_model_len, timings, quantization)


def effective_quantization(requested: str | None, arch: ModelArchConfig, device: torch.device) -> str | None:
    """What the projections become: `requested` ("fp8", or "none" for the checkpoint's own weights), or when
    it is None, FP8 matmuls for an FP8 checkpoint on a GPU that has them (vLLM's default) and none otherwise (the
    CPU dequantizes: its FP8 matmuls are no faster)."""
    from ember.model import fp8

    if requested == "none":
        return None
    if requested is not None:  # refused before any weight is read
        if requested != "fp8":
            raise ValueError(f"unknown quantization {requested!r}; ember has fp8")
        if not fp8.supported(device):
            raise ValueError(f"--quantization fp8 needs a Hopper or Blackwell data-center GPU (compute capability "
                             f"9.x or 10.x), or the CPU; {device} is {torch.cuda.get_device_name(device)}")
        return requested
    if arch.quantization and device.type == "cuda" and fp8.supported(device):
        logger.info("FP8 checkpoint on a GPU with FP8 matmuls: the projections stay FP8 (--quantization none "
                    "dequantizes them instead)")
        return "fp8"
    return None


def _max_model_len(arch: ModelArchConfig, requested: int | None) -> int:
    limit = arch.max_position_embeddings
    if arch.sliding_window:
        # Without sliding-window attention, the window bounds the context the model was trained for.
        limit = min(limit, arch.sliding_window)
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"--max-model-len {requested} exceeds the model's limit of {limit} tokens")
    return requested


def num_kv_blocks(config: EngineConfig, loaded: LoadedModel, block_size: int, kv_dtype: torch.dtype,
                  tp: TensorParallel) -> int:
    """KV-cache blocks for the budget (a given size, or what profiling leaves of --gpu-memory-utilization); every
    tensor-parallel rank runs this (the GPU profiling pass has all-reduces) and they keep the smallest count."""
    if config.num_gpu_blocks_override:
        return config.num_gpu_blocks_override
    per_block = bytes_per_block(loaded.arch, block_size, kv_dtype, tp.size)
    if config.kv_cache_memory_bytes:
        budget = config.kv_cache_memory_bytes
    elif loaded.device.type == "cuda":
        budget = _profile_free_gpu_memory(config, loaded)
    else:
        budget = CPU_DEFAULT_KV_BYTES
    # Never more than all sequences could use at full length.
    ceiling = -(-loaded.max_model_len // block_size) * max(config.max_num_seqs, 1)
    num = tp.agree_min(int(min(budget // per_block, ceiling)))
    if num < -(-loaded.max_model_len // block_size):
        logger.warning("KV cache holds %d tokens, less than one sequence of max_model_len %d",
                       num * block_size, loaded.max_model_len)
    if num < 1:
        raise ValueError(f"the KV cache budget of {budget} bytes holds no block ({per_block} bytes each)")
    return num


def _profile_free_gpu_memory(config: EngineConfig, loaded: LoadedModel) -> int:
    """Bytes left for the KV cache: the utilisation target minus weights and a peak activation pass."""
    model, device = loaded.model, loaded.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    n = min(config.max_num_batched_tokens or 8192, loaded.max_model_len)
    with torch.inference_mode():
        ids = torch.zeros(n, dtype=torch.long, device=device)
        hidden = model.model.embed_tokens(ids)
        # The biggest activations: one layer's MLP on a full token budget, and the logits of a full batch.
        model.model.layers[0].mlp(hidden)
        model.compute_logits(hidden[: min(n, config.max_num_seqs)])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    budget = int(total * config.gpu_memory_utilization) - peak - used_by_others
    torch.cuda.empty_cache()
    return max(budget, 0)


STEP_DRAIN_TIMEOUT_S = 30.0


def _shut_down_tensor_parallel(workers: WorkerGroup, tp: TensorParallel, graph_runners: list[ModelRunner]) -> None:
    """Stop the workers, then free this rank's CUDA graphs, then its model group, in that order: left to the
    interpreter's exit, NCCL's teardown hung while graphs that captured its all-reduces were alive. A step still
    queued (async scheduling) runs to its end first: workers leave at once on the stop message, and the driver's
    all-reduces of that step wait for theirs."""
    if workers.device.type == "cuda":
        # Bounded: a dead worker's share never comes.
        finished = drained(torch.cuda.current_stream(workers.device), STEP_DRAIN_TIMEOUT_S, 0.001)
        if not finished and tp.symm is not None and not workers.all_alive():
            # The one-shot all-reduce waits for a dead rank forever (NCCL's watchdog would abort the process):
            # nothing after this could use the GPU, nor tear the group down.
            logger.critical("a tensor-parallel worker died with a step in flight; the GPU cannot finish it: exiting")
            sys.stderr.flush()
            os._exit(1)
    workers.stop()
    for runner in graph_runners:
        runner.release_graphs()
    graph_runners.clear()
    tp.shutdown()
    workers.closed = True


def decode_graph_shape(config: EngineConfig, device: torch.device, attn: AttentionBackend,
                       max_model_len: int) -> tuple[int, int] | None:
    """(largest batch, blocks a sequence) of the decode graphs to capture, or None to run every step eagerly."""
    if device.type != "cuda" or config.enforce_eager or attn.name != "triton":
        return None
    return min(config.cuda_graph_max_batch, config.max_num_seqs), -(-max_model_len // config.block_size)


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        """`loaded` lets several engines (different cache or scheduler settings) share one set of weights."""
        self.config = config
        if config.compile_cache_dir:  # before anything compiles: the warm-up and graph capture below
            use_compile_cache(config.compile_cache_dir)
        self.workers: WorkerGroup | None = None
        self.tp = TensorParallel()
        self._graph_runners: list[ModelRunner] = []  # whose graphs go before the tensor-parallel group does
        if config.tensor_parallel_size > 1:
            if loaded is not None:
                raise ValueError("a tensor-parallel engine loads its own shards; it cannot share a LoadedModel")
            self.workers = WorkerGroup(config)
            try:
                self.tp = self.workers.connect_driver()
                loaded = load_model(config, self.tp)
                self.workers.wait_ready()
            except BaseException:
                self.workers.stop()
                raise
            # Stops the worker processes if the engine is dropped without close().
            self._finalizer = weakref.finalize(self, _shut_down_tensor_parallel, self.workers, self.tp,
                                               self._graph_runners)
            logger.info("tensor parallelism over %d processes", config.tensor_parallel_size)
        if loaded is not None and config.quantization is not None and \
                loaded.quantization != effective_quantization(config.quantization, loaded.arch, loaded.device):
            raise ValueError(f"the shared model was loaded with quantization {loaded.quantization!r}, this engine's "
                             f"config asks for {config.quantization!r}")
        try:
            self._build(config, loaded or load_model(config))
        except BaseException:
            self.close()  # the workers would otherwise outlive a failed engine until the traceback is dropped
            raise

    def _build(self, config: EngineConfig, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.arch = self.loaded.arch
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.device, self.dtype = self.loaded.device, self.loaded.dtype
        self.model_name = self.loaded.name
        self.max_model_len = self.loaded.max_model_len
        self.timings = self.loaded.timings

        t3 = time.perf_counter()
        self.block_size = config.block_size
        self.kv_dtype = kv_cache_dtype(config.kv_cache_dtype, self.dtype, self.device)
        num_blocks = num_kv_blocks(config, self.loaded, self.block_size, self.kv_dtype, self.tp)
        self.kv_caches = allocate_kv_cache(self.arch, num_blocks, self.block_size, self.kv_dtype, self.device,
                                           self.tp.size)
        self.timings.kv_cache_s = time.perf_counter() - t3
        logger.info("KV cache: %d blocks of %d tokens (%d tokens, %s)", num_blocks, self.block_size,
                    num_blocks * self.block_size, str(self.kv_dtype).removeprefix("torch."))

        self.block_manager = BlockManager(num_blocks, self.block_size, config.enable_prefix_caching)
        max_batched = config.max_num_batched_tokens or (8192 if self.device.type == "cuda" else 2048)
        if not config.enable_chunked_prefill:
            max_batched = max(max_batched, self.max_model_len)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, max(max_batched, self.block_size),
                                   config.enable_chunked_prefill)
        self.eos_token_ids = self.tokenizer.eos_token_ids
        self.runner = ModelRunner(self.model, self.kv_caches, self.block_size, self.device,
                                  get_attention_backend(config.attention_backend, self.device),
                                  Sampler(self.eos_token_ids), self.tp)
        if self.workers is not None:
            self.workers.mark_running()
        shape = decode_graph_shape(config, self.device, self.runner.attn, self.max_model_len)
        self.cuda_graphs_enabled = shape is not None
        if shape is not None:  # tensor-parallel workers capture theirs at the same time
            t4 = time.perf_counter()
            self.runner.enable_cuda_graphs(*shape)
            self._graph_runners.append(self.runner)
            self.timings.cuda_graphs_s = time.perf_counter() - t4
        self.detokenizer = Detokenizer(self.tokenizer)
        self.requests: dict[str, Request] = {}
        self._next_seq_id = 0
        self._finished_unreported: list[Request] = []
        # Async scheduling (default on CUDA): at most one step queued whose tokens are not read back.
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type == "cuda")
        self._inflight: InflightStep | None = None
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.warm_up()
        t = self.timings
        logger.info("engine ready: resolve %.2f s, tokenizer %.2f s, weights %.2f s, KV cache %.2f s, "
                    "CUDA graphs %.2f s, warm-up %.2f s", t.resolve_s, t.tokenizer_s, t.weights_s, t.kv_cache_s,
                    t.cuda_graphs_s, t.warm_up_s)

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (an engine without them holds nothing to release); its steps
        fail afterwards."""
        if self.workers is not None:
            self._finalizer()

    def warm_up(self) -> None:
        """A short request through prefill and decode, so the first real one pays no one-time costs (kernel
        compilation, first-touch of weights and cache pages); counters start from zero after it.

        With CUDA graphs (the mode that compiles everything at boot) also one prefill of each power-of-two
        length up to 64: the attention kernel's tile height follows the longest query of a step, and each
        height is a kernel of its own. Captured decode graphs already cover the decode variants. Eager mode
        keeps its fast boot and compiles those kernels when a step first needs them.
        """
        t = time.perf_counter()
        lengths = [8]
        if self.cuda_graphs_enabled:
            room = min(self.max_model_len, self.block_manager.num_blocks * self.block_size)
            lengths += [n for n in (2, 4, 16, 32, 64) if n + 1 <= room]
        for i, n in enumerate(lengths):
            self.add_request(f"ember-warm-up-{i}", None, [self.arch.bos_token_id or 0] * n,
                             SamplingParams(temperature=0, max_tokens=4 if i == 0 else 1, ignore_eos=True))
            while self.has_unfinished_requests():
                self.step()
            self.block_manager.reset_prefix_cache()  # the next prompt's tokens must all be computed
        self.block_manager.prefix_queries = self.block_manager.prefix_hits = 0
        self.num_prompt_tokens_total = self.num_generation_tokens_total = 0
        self.timings.warm_up_s = time.perf_counter() - t

    # -------------------------------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                    params: SamplingParams) -> Request:
        if request_id in self.requests:
            raise RequestValidationError(f"request id {request_id!r} is already in use", "request_id")
        if prompt_token_ids is None:
            if prompt is None:
                raise RequestValidationError("a prompt (text or token ids) is required", "prompt")
            prompt_token_ids = self.tokenizer.encode(prompt)
        ids = list(prompt_token_ids)
        max_tokens = self._validate(ids, params)
        if max_tokens != params.max_tokens:  # never write into the caller's params: they may be shared
            params = params.clone(max_tokens=max_tokens)
        req = Request(request_id, prompt, ids, params)
        for i in range(params.n):
            seq = Sequence(self._next_seq_id, req, i)
            self._next_seq_id += 1
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self.num_prompt_tokens_total += len(ids)
        return req

    def _validate(self, ids: list[int], params: SamplingParams) -> int:
        """Raises RequestValidationError; returns the effective max_tokens."""
        if not ids:
            raise RequestValidationError("the prompt is empty", "prompt")
        vocab = self.arch.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
            raise RequestValidationError(f"prompt token ids must be in [0, {vocab})", "prompt")
        try:
            params.check_vocab(vocab)
        except SamplingParamsError as e:
            raise RequestValidationError(str(e), e.param) from None
        n, limit = len(ids), self.max_model_len
        if params.max_tokens is None:
            if n >= limit:
                raise RequestValidationError(
                    f"This model's maximum context length is {limit} tokens. However, your prompt has {n} "
                    "tokens, leaving no room for the completion.", "prompt", "context_length_exceeded")
        elif n + params.max_tokens > limit:
            raise RequestValidationError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} for the completion). "
                "Please reduce the prompt or max_tokens.", "max_tokens" if params.max_tokens else "prompt",
                "context_length_exceeded")
        need = self.block_manager.blocks_needed(n + (params.max_tokens != 0))  # a slot for the first token
        if need > self.block_manager.num_blocks:
            raise RequestValidationError(
                f"the prompt needs {need} KV blocks but the cache has only {self.block_manager.num_blocks}",
                "prompt", "context_length_exceeded")
        return params.max_tokens if params.max_tokens is not None else limit - n

    def abort_request(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        for seq in req.seqs:
            self.scheduler.finish(seq, "abort")
        self._finished_unreported.append(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """Schedule and run one step; returns the outputs of the requests it advanced.

        With async scheduling, a step (decodes and prefill chunks alike, see `_can_overlap`) is queued on the
        GPU and its tokens are read back during the next step, after that one is queued: the host's bookkeeping
        (detokenizing, stop checks, outputs, scheduling) overlaps the GPU's work instead of leaving it idle.
        Sampled tokens then trail by one step; a chunk that samples nothing reports in its own step, as it
        would synchronously.
        """
        if self.workers is not None and self.workers.stopped:
            raise RuntimeError("this engine was closed: its tensor-parallel workers have exited")
        # A sequence whose pending token is certainly its last (by length) needs no further step: skipped before
        # the scheduler gives it a block, which could cost another sequence a preemption. (Waiting sequences
        # have no pending token: one preempted with it is not readmitted before the next read-back.)
        sched = self.scheduler.schedule(skip=self._ends_with_pending if self._inflight is not None else None)
        touched: dict[str, Request] = {r.request_id: r for r in self._finished_unreported}
        self._finished_unreported = []
        overlap = self._can_overlap(sched)
        if self._inflight is not None and not overlap:
            self._resolve(touched)
            sched.scheduled = [i for i in sched.scheduled if not i.seq.is_finished]
            overlap = self._can_overlap(sched)  # the tokens just read may have changed it (min_tokens)
        if overlap:
            launched = self.runner.launch(sched, self._inflight)
            for item in sched.scheduled:
                seq = item.seq
                seq.num_computed_tokens += item.num_new_tokens
                if item.samples:
                    seq.num_pending += 1  # touched when read back
                else:
                    touched[seq.request.request_id] = seq.request
                # Full blocks of known tokens can be shared now: whoever reuses them runs after this step on
                # the device. A block that ends in a pending token waits for its id, in _resolve.
                self.block_manager.cache_full_blocks(seq)
            if self._inflight is not None:
                self._resolve(touched)
            self._inflight = launched
        elif sched.scheduled:
            result = self.runner.execute(sched)
            for item in sched.scheduled:
                item.seq.num_computed_tokens += item.num_new_tokens
                self.block_manager.cache_full_blocks(item.seq)
                touched[item.seq.request.request_id] = item.seq.request
            self._record_prompt_logprobs(result)
            for seq, token, lp in zip(result.sample_seqs, result.sampled.token_ids, result.sampled.logprobs,
                                      strict=True):
                self._append_token(seq, token, lp)
        elif self._inflight is not None:
            self._resolve(touched)
        outputs = [self._make_output(r) for r in touched.values()]
        for r in touched.values():
            if r.finished:
                self.requests.pop(r.request_id, None)
        return outputs

    def _can_overlap(self, sched: SchedulerOutput) -> bool:
        """Whether this step can be queued before the previous one's tokens are known: nothing in it needs the
        host's view of the newest token. Inputs not read back come from the device wherever they sit in the
        batch, so any chunk qualifies; what is excluded is sampling that reads host state (grammar, penalties,
        the min_tokens ban), logprobs (read back with the tokens), and prompt logprobs (computed and read back
        within the step)."""
        if not self.async_scheduling or not sched.scheduled:
            return False
        for item in sched.scheduled:
            seq, p = item.seq, item.seq.params
            if seq.request.wants_prompt_logprobs(seq):
                return False
            if not item.samples:  # a chunk short of the end: its KV is all it produces
                continue
            if seq.grammar is not None or p.logprobs is not None:
                return False
            if p.has_penalties:
                return False
            if p.min_tokens and seq.num_output_tokens <= p.min_tokens:  # the ban depends on the exact count
                return False
        return True

    def _ends_with_pending(self, seq: Sequence) -> bool:
        out = seq.num_output_tokens + seq.num_pending
        return seq.num_pending > 0 and (out >= (seq.params.max_tokens or 0) or seq.num_tokens >= self.max_model_len)

    def _resolve(self, touched: dict[str, Request]) -> None:
        """Read back the in-flight step's tokens and process them as a synchronous step would have."""
        inflight, self._inflight = self._inflight, None
        assert inflight is not None
        for seq, token in zip(inflight.seqs, inflight.token_ids(), strict=True):
            seq.num_pending -= 1
            if seq.is_finished:  # aborted, or ended by the token before this one: the step was wasted
                continue
            self.block_manager.cache_full_blocks(seq)  # before the token may end the sequence and free them
            self._append_token(seq, token, None)
            touched[seq.request.request_id] = seq.request

    def _record_prompt_logprobs(self, result: StepResult) -> None:
        for seq, first, rows in result.prompt_logprobs:
            req = seq.request
            if req.prompt_logprobs is None:
                req.prompt_logprobs = [None]
            # Row j is the logprob of prompt token first+j+1; rows already recorded (after a preemption) are
            # skipped.
            for j, row in enumerate(rows):
                pos = first + j + 1
                if pos == len(req.prompt_logprobs):
                    req.prompt_logprobs.append(self._position_logprobs(req.prompt_token_ids[pos], row))

    def _position_logprobs(self, token: int, row: LogprobRow) -> PositionLogprobs:
        lp, rank, top = row
        text = self.detokenizer.token_text
        out: PositionLogprobs = {token: Logprob(lp, rank, text(token))}
        for r, (tid, tlp) in enumerate(top, start=1):
            if tid not in out:
                out[tid] = Logprob(tlp, r, text(tid))
        return out

    def _append_token(self, seq: Sequence, token: int, lp: LogprobRow | None) -> None:
        if seq.is_finished:  # aborted while the step ran
            return
        req = seq.request
        p = seq.params
        if p.max_tokens == 0:  # a prompt only scored: the token sampled after its prefill is not kept
            self.scheduler.finish(seq, "length")
            return
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        seq.token_ids.append(token)
        self.num_generation_tokens_total += 1
        if lp is not None and seq.logprobs is not None:
            seq.logprobs.append(self._position_logprobs(token, lp))
        if seq.grammar is not None and not seq.grammar.accept_token(token):
            # The mask should have made this impossible; llguidance's matcher now reports itself stopped, so the
            # sequence ends with "stop" and text the grammar does not accept: say so where it can be seen.
            logger.error("request %s: its grammar rejected the sampled token %d (output so far %d tokens)",
                         req.request_id, token, seq.num_output_tokens)
        # A stop token ends the text before it: flush what precedes it, never its own text.
        if token in p.stop_token_ids:
            self.detokenizer.flush(seq, end=len(seq.token_ids) - 1)
            self.scheduler.finish(seq, "stop", token)
            return
        if not p.ignore_eos and token in self.eos_token_ids:
            self.detokenizer.flush(seq, end=len(seq.token_ids) - 1)
            self.scheduler.finish(seq, "stop", None)
            return
        new_text = self.detokenizer.append_token(seq)
        hit = find_stop_string(seq, len(new_text))
        if hit is not None:
            stop, idx = hit
            seq.detok.output_text = seq.detok.output_text[:idx + (len(stop) if p.include_stop_str_in_output
                                                                   else 0)]
            self.scheduler.finish(seq, "stop", stop)
            return
        if seq.grammar is not None and seq.grammar.is_terminated():
            # The structure is complete: end here, as if the grammar's end-of-sequence had been sampled.
            self.detokenizer.flush(seq)
            self.scheduler.finish(seq, "stop")
            return
        if seq.num_output_tokens >= (p.max_tokens or 0) or len(seq.token_ids) >= self.max_model_len:
            self.detokenizer.flush(seq)
            self.scheduler.finish(seq, "length")

    def _make_output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            delta_text = releasable_text(seq, seq.is_finished)
            out_ids = seq.output_token_ids
            delta_ids = out_ids[seq.emitted_tokens:]
            seq.emitted_tokens = len(out_ids)
            delta_lps = None
            if seq.logprobs is not None:
                delta_lps = seq.logprobs[seq.emitted_logprobs:]
                seq.emitted_logprobs = len(seq.logprobs)
            outs.append(CompletionOutput(
                index=seq.index, text=seq.detok.output_text[:seq.detok.emitted_chars], token_ids=list(out_ids),
                logprobs=seq.logprobs, delta_text=delta_text, delta_token_ids=delta_ids,
                delta_logprobs=delta_lps, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        prompt_lps = req.prompt_logprobs if req.params.prompt_logprobs is not None else None
        queued = None if req.first_scheduled_time is None else req.first_scheduled_time - req.arrival_time
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished, prompt_lps,
                             num_cached_tokens=req.seqs[0].num_cached_tokens, queue_time_s=queued)

    # ----------------------------------------------------------------------------------------- stats
    def stats(self) -> dict[str, float | int]:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_requests": len(self.requests),
            "kv_cache_usage": bm.usage,
            "num_free_blocks": bm.num_free_blocks,
            "num_total_blocks": bm.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "prompt_tokens_total": self.num_prompt_tokens_total,
            "generation_tokens_total": self.num_generation_tokens_total,
        }
