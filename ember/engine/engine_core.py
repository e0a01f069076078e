"""The engine core in a process of its own: `LLMEngine`'s step loop, fed and drained over two pipes.

In one process the HTTP event loop and the step loop take turns holding the GIL, and every millisecond the
server spends parsing, tokenizing or streaming is a millisecond the step loop cannot prepare the next step
(DESIGN §1). Here the step loop has an interpreter to itself: it receives commands (add, abort, shutdown)
between steps and sends back, once per step, what changed: replies to the adds it took, each advanced request's
new tokens and text (deltas only: the client keeps the rest), and the engine's counters.

`ProcessEngine` (ember/engine/process_engine.py) is the other end.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from ember.config import EngineConfig
from ember.outputs import PositionLogprobs, RequestOutput
from ember.tokenizer import Tokenizer


class CompletionDelta(NamedTuple):
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None
    stop_reason: int | str | None


class RequestDelta(NamedTuple):
    """What one step changed of a request; the prompt and everything sent before stay with the client."""

    request_id: str
    finished: bool
    outputs: list[CompletionDelta]
    prompt_logprobs: list[PositionLogprobs | None] | None
    num_cached_tokens: int
    queue_time_s: float | None


class EngineInfo(NamedTuple):
    """Sent once, when the engine is ready: what the HTTP layer reads off an engine."""

    model_name: str
    max_model_len: int
    vocab_size: int
    tokenizer: Tokenizer
    stats: dict[str, Any]


# Core -> client messages: ("ready", EngineInfo), ("failed", error), ("dead", error) and, once per loop turn that
# did anything, ("update", replies, deltas, stats) where a reply is (request_id, None | the add's error).
# Client -> core: ("add", request_id, prompt, prompt_token_ids, params), ("abort", request_id), ("shutdown",).


def request_delta(out: RequestOutput, prompt_logprobs_sent: int) -> RequestDelta:
    """`prompt_logprobs_sent`: positions of the prompt's logprobs sent before (they grow chunk by chunk during a
    chunked prefill); only the rest goes."""
    lps = None if out.prompt_logprobs is None else out.prompt_logprobs[prompt_logprobs_sent:]
    return RequestDelta(out.request_id, out.finished,
                        [CompletionDelta(c.index, c.delta_text, c.delta_token_ids, c.delta_logprobs, c.finish_reason,
                                         c.stop_reason) for c in out.outputs],
                        lps, out.num_cached_tokens, out.queue_time_s)


def portable_error(e: BaseException) -> BaseException:
    """`e` if it survives pickling (the client re-raises it as it is), else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(e))
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")
    return e


def run_engine_core(config: EngineConfig, commands: Connection, outputs: Connection, log_level: int) -> None:
    """The engine process's main: load, report ready (or why not), then serve commands until "shutdown" or
    until the client's end of the pipe closes (the client process is gone)."""
    from ember.engine.heap import freeze_startup_heap
    from ember.engine.llm_engine import LLMEngine
    from ember.engine.workers import exit_with_parent
    from ember.server.faults import install_from_env

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The client decides when the engine stops (after draining its requests, on SIGINT or SIGTERM): a Ctrl-C
    # or a service manager's SIGTERM to the whole process group must not kill the engine under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exit_with_parent()
    log = logging.getLogger(__name__)
    try:
        engine = LLMEngine(config)
        install_from_env(engine)
    except BaseException as e:
        log.exception("the engine failed to load")
        outputs.send(("failed", portable_error(e)))
        sys.exit(1)
    freeze_startup_heap()
    outputs.send(("ready", EngineInfo(engine.model_name, engine.max_model_len, engine.arch.vocab_size,
                                      engine.tokenizer, engine.stats())))
    try:
        serve_commands(engine, commands, outputs)
    except BaseException as e:
        log.exception("engine step loop died")
        try:
            outputs.send(("dead", portable_error(e)))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            # Not a normal exit: tensor-parallel teardown would wait for a step that may never end.
            os._exit(1)
    engine.close()


def serve_commands(engine: Any, commands: Connection, outputs: Connection) -> None:
    """The step loop. Commands are read between steps; an idle engine blocks on the pipe. A grammar that arrives
    is compiled here, between steps (the first one also converts the tokenizer for llguidance, ~0.3 s, as the
    in-process server does at its first structured request)."""
    from ember.structured.portable import resolve_grammar

    prompt_logprobs_sent: dict[str, int] = {}
    while True:
        if not engine.has_unfinished_requests():
            commands.poll(None)  # wakes on a command or on EOF (then recv raises EOFError below)
        replies: list[tuple[str, BaseException | None]] = []
        handled = False
        while commands.poll(0):
            try:
                msg = commands.recv()
            except EOFError:  # the client is gone
                return
            handled = True
            kind = msg[0]
            if kind == "add":
                _, request_id, prompt, ids, params = msg
                try:
                    engine.add_request(request_id, prompt, ids, resolve_grammar(params, engine.tokenizer))
                except Exception as e:  # validation errors go back to the caller; the loop goes on
                    replies.append((request_id, portable_error(e)))
                else:
                    replies.append((request_id, None))
            elif kind == "abort":
                engine.abort_request(msg[1])
            elif kind == "shutdown":
                return
        if replies:  # before the step: a refused request need not wait for it
            outputs.send(("update", replies, [], engine.stats()))
        deltas = []
        if engine.has_unfinished_requests():
            for out in engine.step():
                rid = out.request_id
                deltas.append(request_delta(out, prompt_logprobs_sent.get(rid, 0)))
                if out.finished:
                    prompt_logprobs_sent.pop(rid, None)
                elif out.prompt_logprobs is not None:
                    prompt_logprobs_sent[rid] = len(out.prompt_logprobs)
        if deltas or (handled and not replies):
            outputs.send(("update", [], deltas, engine.stats()))
