"""`ember deploy ray`: ember's own FastAPI app on Ray Serve, one engine per replica, behind Ray's HTTP proxy.

Ray Serve brings what a single `ember serve` lacks: several replicas behind one endpoint, a per-replica cap on
requests in flight, and autoscaling (down to zero). Each replica builds the very app `ember serve` runs
(`ember.server.app.build_app` + `attach_engine`), so endpoints, errors and streaming behave the same.

Nothing here imports ray at module level: the CLI parser is built on every `ember` invocation, and ray is an
optional extra (`pip install 'ember[ray]'`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING, Any

from ember.cli import (
    _HelpFormatter,
    _port,
    add_engine_args,
    api_keys_from_args,
    engine_config_from_args,
    int_at_least,
    served_model_names,
)
from ember.config import EngineConfig
from ember.server.config import PUBLIC_ENDPOINTS, ServerConfig

if TYPE_CHECKING:
    from ray.serve import Application

APP_NAME = "ember"
DEPLOYMENT_NAME = "EmberServer"
# The flags that switch from a fixed replica count to Ray's autoscaler.
AUTOSCALING_FLAGS = ("min_replicas", "max_replicas", "target_ongoing_requests", "downscale_delay_s")


# --------------------------------------------------------------------------- argument types


def _non_negative_float(s: str) -> float:
    v = float(s)
    if not 0.0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {s}")
    return v


def _queue_len(s: str) -> int:
    v = int(s)
    if v < 1 and v != -1:
        raise argparse.ArgumentTypeError(f"must be -1 (no limit) or at least 1, got {v}")
    return v


def _positive_float(s: str) -> float:
    v = _non_negative_float(s)
    if v == 0.0:
        raise argparse.ArgumentTypeError("must be positive")
    return v


# --------------------------------------------------------------------------- parser


def add_ray_parser(targets: Any) -> None:
    """`ember deploy ray`: the engine flags of `ember serve`, plus replica, autoscaling and Ray options."""
    p = targets.add_parser(
        "ray", help="serve on Ray Serve: replicas behind one HTTP endpoint, autoscaling",
        description="Run ember's OpenAI-compatible server as a Ray Serve application: each replica owns one "
                    "engine; Ray's proxy spreads requests over the replicas. Needs `pip install 'ember[ray]'`.",
        formatter_class=_HelpFormatter)
    add_engine_args(p)
    srv = p.add_argument_group("server")
    srv.add_argument("--host", default="127.0.0.1", help="address Ray's HTTP proxy listens on")
    srv.add_argument("--port", type=_port, default=8000, help="0 picks a free port")
    srv.add_argument("--api-key", action="append", default=None, metavar="KEY",
                     help="require 'Authorization: Bearer KEY' on the API routes (repeat for several keys; "
                          "default: $EMBER_API_KEY)")
    srv.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                     help="each replica runs its engine's step loop in a process of its own (default: on with a "
                          "GPU, off on a CPU, as `ember serve`)")
    srv.add_argument("--public-endpoints", nargs="*", default=list(PUBLIC_ENDPOINTS), choices=PUBLIC_ENDPOINTS,
                     metavar="NAME", help=f"of {', '.join(PUBLIC_ENDPOINTS)}: those that need no API key")
    rep = p.add_argument_group("replicas (a fixed --num-replicas, or autoscaling with the --*-replicas flags)")
    rep.add_argument("--num-replicas", metavar="N", type=int_at_least(1), default=None,
                     help="fixed number of replicas (default: 1, unless an autoscaling flag is given)")
    rep.add_argument("--min-replicas", metavar="N", type=int_at_least(0), default=None,
                     help="autoscaling: fewest replicas; 0 scales to zero when idle (default: 1)")
    rep.add_argument("--max-replicas", metavar="N", type=int_at_least(1), default=None,
                     help="autoscaling: most replicas (default: max(--min-replicas, 1))")
    rep.add_argument("--target-ongoing-requests", metavar="N", type=_positive_float, default=None,
                     help="autoscaling: requests in flight per replica that the autoscaler aims at "
                          "(default: half of --max-ongoing-requests)")
    rep.add_argument("--downscale-delay-s", metavar="S", type=_non_negative_float, default=None,
                     help="autoscaling: seconds of low load before a replica is removed, also the idle time "
                          "before scaling to zero (default: Ray's, 600)")
    rep.add_argument("--max-ongoing-requests", metavar="N", type=int_at_least(1), default=None,
                     help="most requests one replica handles at once; Ray queues the rest in its proxy "
                          "(default: --max-num-seqs, what one engine batches)")
    rep.add_argument("--max-queued-requests", metavar="N", type=_queue_len, default=-1,
                     help="requests Ray's proxy may queue for busy replicas; past that it answers 503 "
                          "(-1: no limit)")
    rep.add_argument("--num-gpus-per-replica", metavar="N", type=_non_negative_float, default=None,
                     help="GPUs Ray reserves for each replica (default: 1 if the Ray cluster has GPUs, else 0)")
    rep.add_argument("--num-cpus-per-replica", metavar="N", type=_non_negative_float, default=1.0,
                     help="CPUs Ray reserves for each replica")
    ray_ = p.add_argument_group("Ray")
    ray_.add_argument("--app-name", default=APP_NAME, metavar="NAME",
                      help="the Serve application's name; on a shared cluster, one that no other app uses")
    ray_.add_argument("--address", default=None, metavar="ADDR",
                      help="Ray cluster to use (e.g. auto, or ray://head:10001); default: start a local one "
                           "for this command")

    def run(args: argparse.Namespace) -> int:
        try:
            deployment_options(args)  # refuse conflicting flags before Ray starts
        except ValueError as e:
            p.error(str(e))
        return run_deploy(args, engine_config_from_args(args))

    p.set_defaults(handler=run)


# --------------------------------------------------------------------------- flags -> Ray options


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The server settings a replica's app uses; host and port are Ray's proxy's, not the app's."""
    return ServerConfig(host=args.host, port=args.port, served_model_names=served_model_names(args),
                        api_keys=api_keys_from_args(args),
                        public_endpoints=list(args.public_endpoints), max_num_seqs=args.max_num_seqs,
                        engine_process=args.engine_process)


def deployment_options(args: argparse.Namespace, cluster_gpus: float = 0.0) -> dict[str, Any]:
    """Keyword arguments for `serve.deployment(...).options()`; `cluster_gpus`: GPUs the Ray cluster has.
    Raises ValueError for flags that contradict each other."""
    autoscaling = any(getattr(args, f) is not None for f in AUTOSCALING_FLAGS)
    if autoscaling and args.num_replicas is not None:
        raise ValueError("--num-replicas is a fixed count: give it or the autoscaling flags, not both")
    max_ongoing = args.max_ongoing_requests or args.max_num_seqs
    gpus = args.num_gpus_per_replica
    if gpus is None:  # one per tensor-parallel rank: the replica's worker processes use the replica's GPUs
        gpus = float(args.tensor_parallel_size) if cluster_gpus > 0 and args.device != "cpu" else 0.0
    if args.tensor_parallel_size > 1 and 0 < gpus < args.tensor_parallel_size:
        raise ValueError(f"--tensor-parallel-size {args.tensor_parallel_size} needs a GPU per rank: "
                         f"--num-gpus-per-replica {gpus:g} is too few")
    if 0 < gpus < 1 and args.kv_cache_memory_bytes is None:
        # Each replica sizes its KV cache from the card's free memory, which the others on the card already
        # hold: the second one would get nothing.
        raise ValueError("replicas sharing a GPU (--num-gpus-per-replica below 1) need --kv-cache-memory-bytes")
    actor: dict[str, Any] = {"num_gpus": gpus, "num_cpus": args.num_cpus_per_replica}
    if gpus == 0:
        # Ray leaves CUDA_VISIBLE_DEVICES alone for a replica without GPUs: hide them, or every such replica
        # would put its model on cuda:0.
        actor["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}
    opts: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": max_ongoing,
        "max_queued_requests": args.max_queued_requests,
        "ray_actor_options": actor,
    }
    if autoscaling:
        low = 1 if args.min_replicas is None else args.min_replicas
        high = max(low, 1) if args.max_replicas is None else args.max_replicas
        if high < low:
            raise ValueError(f"--max-replicas ({high}) must be at least --min-replicas ({low})")
        opts["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "target_ongoing_requests": args.target_ongoing_requests or max(1.0, max_ongoing / 2),
        }
        if args.downscale_delay_s is not None:
            opts["autoscaling_config"]["downscale_delay_s"] = args.downscale_delay_s
    else:
        opts["num_replicas"] = args.num_replicas or 1
    return opts


# --------------------------------------------------------------------------- the replica


class EmberReplica:
    """One replica: ember's HTTP app and the engine it owns (in a process of its own or not, as `ember serve`
    decides). Wrapped by `serve.ingress()` at deploy time, which serves the app returned by
    `__serve_build_asgi_app__`."""

    async def __init__(self, engine_config: EngineConfig, server_config: ServerConfig) -> None:
        # Imported here: these pull in torch and the model code, which only replicas need.
        from ember.server.app import attach_engine, build_app
        from ember.server.launcher import default_engine_factory

        self._engine: Any = None
        self._app = build_app(None, server_config)
        # Ray routes nothing to a replica until its constructor returns, so loading here replaces the 503s
        # `ember serve` answers while loading. The load runs off the event loop so Ray's calls keep working.
        engine = await asyncio.to_thread(default_engine_factory, engine_config, server_config.engine_process)
        await engine.start()  # on Ray's user-code loop, where the app's handlers run too
        self._engine = engine
        attach_engine(self._app, engine)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app

    async def check_health(self) -> None:
        """Ray's health probe: a dead engine makes Ray replace the replica, as a supervisor restarts `ember
        serve` after it exits non-zero."""
        if self._engine is not None and self._engine.errored:
            raise RuntimeError(f"the ember engine has died: {self._engine.dead_error!r}")

    async def __del__(self) -> None:
        if self._engine is not None:
            await self._engine.shutdown()


def build_application(engine_config: EngineConfig, server_config: ServerConfig,
                      options: dict[str, Any]) -> Application:
    """The Ray Serve application: `EmberReplica` with `options` (see `deployment_options`)."""
    from ray import serve

    deployment = serve.deployment(serve.ingress()(EmberReplica)).options(**options)
    return deployment.bind(engine_config, server_config)


# --------------------------------------------------------------------------- running it


def _free_port(host: str) -> int:
    # Ray's proxy cannot report a port it picked, so pick one here; another process could take it before the
    # proxy binds, which would show as a startup error.
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def deploy(args: argparse.Namespace, engine_config: EngineConfig) -> str:
    """Start Serve on the Ray instance this process is connected to, deploy the app, wait for its replicas
    (none with --min-replicas 0) and return the base URL."""
    import ray
    from ray import serve

    port = args.port or _free_port(args.host)
    # Serve's HTTP options are cluster-wide and fixed once Serve runs: on a cluster where Serve already runs,
    # Ray keeps its own and warns.
    serve.start(http_options={"host": args.host, "port": port})
    options = deployment_options(args, float(ray.cluster_resources().get("GPU", 0)))
    serve.run(build_application(engine_config, server_config_from_args(args), options), name=args.app_name,
              route_prefix="/", blocking=False)
    return _url(args.host, port)


def _wait_for_signal() -> None:
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    stop.wait()
    # A second Ctrl-C must still break out of a shutdown that hangs.
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def run_deploy(args: argparse.Namespace, engine_config: EngineConfig) -> int:
    """Deploy, print the URL, block until Ctrl-C or SIGTERM, then take the app (and a local Ray) down."""
    try:
        import ray
        from ray import serve
    except ImportError:
        print("ember deploy ray needs Ray Serve: pip install 'ember[ray]'", file=sys.stderr)
        return 1

    # Plain prints, not logging: through the root logger each line came out twice once Serve was running.
    # Without --address (or $RAY_ADDRESS, which ray.init reads) the Ray instance is this command's own.
    local = args.address is None and not os.environ.get("RAY_ADDRESS")
    if local:
        # The dashboard would add a process and a port nobody asked for.
        ray.init(include_dashboard=False)
    else:
        ray.init(address=args.address)
    try:
        try:
            url = deploy(args, engine_config)
        except Exception as e:  # a replica that cannot start (bad model path, no GPU) fails the deploy
            print(f"the deployment failed: {e}", file=sys.stderr)
            return 1
        names = ", ".join(server_config_from_args(args).served_model_names)
        print(f"ember on Ray Serve: serving {names} at {url}/v1 (Ctrl-C stops)", flush=True)
        _wait_for_signal()
        print("shutting down", file=sys.stderr)
        return 0
    finally:
        with contextlib.suppress(Exception):  # already down, or unreachable: nothing left to clean up
            if local:
                serve.shutdown()
            else:
                # Someone else's cluster: remove only this app, leave Serve and other apps running.
                serve.delete(args.app_name)
        ray.shutdown()
