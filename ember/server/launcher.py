"""Run the HTTP server: bind first, answer /health with 503 while the model loads, then serve; one ready line.

Binding before loading makes a busy port fail in milliseconds rather than after the model has loaded, and lets
supervisors poll /health during a long load (vLLM, by contrast, listens only once loaded).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from ember.config import EngineConfig
from ember.engine.heap import freeze_startup_heap
from ember.server.app import attach_engine, build_app
from ember.server.config import ServerConfig

logger = logging.getLogger("ember.server")

EngineFactory = Callable[[EngineConfig], Any]


# After the engine dies, keep answering this long (in-flight requests get their 500 or error event, and health
# probes see 503) before exiting non-zero for the supervisor to restart the process.
DEAD_LINGER_S = 2.0
DEATH_POLL_S = 0.2


def cuda_present() -> bool:
    """Whether this machine shows an NVIDIA GPU to this process, asked without importing torch (the server
    side never does when the engine has a process of its own) or initializing CUDA: a GPU device node, and no
    CUDA_VISIBLE_DEVICES that hides them all (CUDA reads that list up to its first invalid entry)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        first = visible.split(",")[0].strip()
        if not (first.isdigit() or first.startswith(("GPU-", "MIG-"))):
            return False
    try:
        # /proc/driver/nvidia lists the host's GPUs even in a container given none; device nodes are per container.
        return any(re.fullmatch(r"nvidia\d+", name) for name in os.listdir("/dev"))
    except OSError:
        return False


def use_engine_process(flag: bool | None, device: str) -> bool:
    """`--engine-process` as given, or by default on where the engine runs on a GPU, where it served many
    streams faster and started within ~0.3 s of the in-process engine (docs/PERFORMANCE.md, thirteenth
    session). On a CPU the model, not the server, bounds a step, and one process starts faster."""
    if flag is not None:
        return flag
    if device == "auto":
        return cuda_present()
    return device.startswith("cuda")


def default_engine_factory(cfg: EngineConfig, engine_process: bool | None = None) -> Any:
    """The engine in a process of its own (`ProcessEngine`) or in this one (`AsyncEngine`)."""
    # Imported late: they pull in torch and the model code.
    if use_engine_process(engine_process, cfg.device):
        from ember.engine.process_engine import ProcessEngine

        logger.info("engine: its step loop runs in a process of its own (--no-engine-process: in this one)")
        return ProcessEngine(cfg)
    from ember.engine.async_engine import AsyncEngine
    from ember.server.faults import install_from_env

    engine = AsyncEngine(cfg)
    install_from_env(engine.engine)
    return engine


class _UvicornServer(uvicorn.Server):
    # uvicorn re-raises SIGINT/SIGTERM after its own shutdown, which would kill the process before the engine
    # is shut down and turn a clean stop into a non-zero exit. EmberServer installs its own handlers instead.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family, type_, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                       flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _in_daemon_thread(fn: Callable[[], Any]) -> asyncio.Future[Any]:
    """Run a blocking call (the model load) off the event loop in a daemon thread, so /health keeps answering
    and Ctrl-C during a long load exits at once instead of waiting for the load to finish."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def run() -> None:
        try:
            result, error = fn(), None
        except BaseException as e:  # handed to the loop, which decides what to do with it
            result, error = None, e
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="ember-model-load", daemon=True).start()
    return fut


class EmberServer:
    """`ember serve` in-process. `serve()` returns the exit code; `stop()` may be called from any thread.
    `freeze_heap`: once ready, freeze what startup built out of the garbage collector's scans (`ember.engine.heap`),
    for a process that only serves (`run_server`)."""

    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig,
                 engine_factory: EngineFactory | None = None, freeze_heap: bool = False) -> None:
        self.engine_config = engine_config
        self.freeze_heap = freeze_heap
        self.server_config = server_config
        self.engine_factory = engine_factory or functools.partial(
            default_engine_factory, engine_process=server_config.engine_process)
        self.app = build_app(None, server_config)
        self.engine: Any = None
        self.url: str | None = None
        self.ready = threading.Event()  # set once the API serves requests
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._engine_died = False

    def stop(self) -> None:
        loop, server = self.loop, self._server
        if loop is None or server is None:
            return
        # A second request (a second Ctrl-C) skips the graceful wait for open connections.
        def request() -> None:
            if server.should_exit:
                server.force_exit = True
            else:
                # uvicorn closes the listening socket at once and waits for open requests up to the grace period.
                logger.info("shutting down: no new connections; in-flight requests have %g s to finish",
                            self.server_config.graceful_shutdown_timeout_s)
            server.should_exit = True

        loop.call_soon_threadsafe(request)

    async def _watch_engine(self, engine: Any, server: uvicorn.Server) -> None:
        """Stop serving, with a non-zero exit code, once the engine's step loop has died."""
        while not engine.errored:
            await asyncio.sleep(DEATH_POLL_S)
        logger.error("the engine has died (%r); exiting in %g s", getattr(engine, "dead_error", None),
                     DEAD_LINGER_S)
        self._engine_died = True
        await asyncio.sleep(DEAD_LINGER_S)
        server.should_exit = True

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        assert self.loop is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # no add_signal_handler here
                self.loop.add_signal_handler(sig, self.stop)

    async def serve(self) -> int:
        started = time.monotonic()
        self.loop = asyncio.get_running_loop()
        cfg = self.server_config
        try:
            sock = _bind(cfg.host, cfg.port)
        except OSError as e:
            logger.error("cannot listen on %s:%s: %s", cfg.host, cfg.port, e)
            return 1
        self.url = _url(sock)
        ucfg = uvicorn.Config(self.app, log_level=cfg.uvicorn_log_level, access_log=cfg.access_log,
                              # uvicorn annotates an int but uses it as an asyncio timeout, where a float is fine.
                              timeout_graceful_shutdown=cfg.graceful_shutdown_timeout_s)  # type: ignore[arg-type]
        if cfg.uvicorn_log_level != "debug":
            # uvicorn's own "running on" lines would appear before the model is ready; ember logs the one that
            # matters (below). Its warnings and errors still show.
            logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        server = self._server = _UvicornServer(ucfg)
        self._install_signal_handlers()
        serving = asyncio.ensure_future(server.serve(sockets=[sock]))
        logger.info("loading model %s", self.engine_config.model or "(embedded SmolLM2-135M-Instruct)")
        loading = _in_daemon_thread(lambda: self.engine_factory(self.engine_config))
        engine = None
        try:
            await asyncio.wait({serving, loading}, return_when=asyncio.FIRST_COMPLETED)
            if serving.done():  # stopped (or failed) while the model was still loading
                serving.result()
                return 0
            try:
                engine = loading.result()
                await engine.start()
            except Exception:
                logger.exception("the engine failed to start")
                return 1
            attach_engine(self.app, engine)
            self.engine = engine
            if self.freeze_heap:  # this process's too, where the engine runs in another
                freeze_startup_heap()
            names = ", ".join(cfg.served_model_names or [engine.model_name])
            logger.info("ember ready in %.1f s: serving %s at %s/v1 (docs: %s/docs)",
                        time.monotonic() - started, names, self.url, self.url)
            self.ready.set()
            watcher = asyncio.ensure_future(self._watch_engine(engine, server))
            try:
                await serving
            finally:
                watcher.cancel()
            return 1 if self._engine_died else 0
        finally:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await serving
            if engine is not None:
                await engine.shutdown()
            sock.close()


def run_server(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    return asyncio.run(EmberServer(engine_config, server_config, freeze_heap=True).serve())
