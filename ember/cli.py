"""The `ember` command: serve | chat | smoke | bench | deploy (vLLM's flag names and meanings where they exist).

Each subcommand is an `add_*` function that adds its parser and sets `handler`; a new subcommand is one such
function appended to SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from ember.config import EMBEDDED_MODEL, KV_CACHE_DTYPES, EngineConfig
from ember.server.config import PUBLIC_ENDPOINTS, TOOL_CALL_PARSERS

Subparsers = Any  # argparse's _SubParsersAction, which is private

DEFAULT_URL = "http://127.0.0.1:8000"
SMOKE_CHATS = (
    ("You are a pirate who can't help but drop sly reminders that he went to Harvard.",
     "Explain the singular value decomposition."),
    ("You are Jar Jar Binks.", "Explain the singular value decomposition."),
)


# --------------------------------------------------------------------------- argument types


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than `low`."""

    def parse(s: str) -> int:
        v = int(s)
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v

    parse.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"
    return parse


_positive_int = int_at_least(1)
_non_negative_int = int_at_least(0)


def _port(s: str) -> int:
    v = int(s)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {v}")
    return v


def _seconds(s: str) -> float:
    v = float(s)
    if not 0.0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {s}")
    return v


def _str_list(s: str) -> list[str]:
    """vLLM's JSON list ('["https://a.example", "https://b.example"]') or a comma-separated list."""
    if s.lstrip().startswith("["):
        try:
            v = json.loads(s)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON list: {e}") from None
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise argparse.ArgumentTypeError("must be a JSON list of strings")
        return v
    return [x.strip() for x in s.split(",") if x.strip()]


def _fraction(s: str) -> float:
    v = float(s)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return v


_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def _byte_size(s: str) -> int:
    """'1073741824', '512MiB', '4GiB', '2G' (SI) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", s.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a byte size: {s!r} (e.g. 1073741824, 512MiB, 4GiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""])


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, unless it is None or the help text already says what happens by default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


def _base_url(url: str) -> str:
    """'http://h:8000', 'http://h:8000/', 'http://h:8000/v1' -> 'http://h:8000'."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


# --------------------------------------------------------------------------- serve


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine's flags (vLLM's names), shared by `serve` and `bench`."""
    d = EngineConfig()
    p.add_argument("model", nargs="?", default=None,
                   help="HF repo id (from the local cache), model directory or .gguf file; "
                        f"default: the embedded {EMBEDDED_MODEL}")
    p.add_argument("--revision", default=d.revision, help="model revision (branch, tag or commit)")
    p.add_argument("--tokenizer", default=d.tokenizer,
                   help="tokenizer directory (default: the model's; the embedded one for dummy weights)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="names clients may use for the model; the first is canonical (default: MODEL)")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations; auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--quantization", "-q", default=d.quantization, choices=["fp8", "none"],
                   help="fp8: FP8 matmuls, on Hopper/Blackwell GPUs or the CPU, from any checkpoint; none: the "
                        "weights in --dtype (an FP8 checkpoint dequantized). Default: fp8 for an FP8 checkpoint "
                        "on such a GPU, else none")
    p.add_argument("--load-format", default=d.load_format, choices=["auto", "safetensors", "gguf", "dummy"],
                   help="dummy: random weights with the real shapes")
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"], help="where the model runs")
    p.add_argument("--seed", type=int, default=d.seed, help="engine seed")
    p.add_argument("--max-model-len", type=_positive_int, default=d.max_model_len,
                   help="context length (default: the model's)")
    p.add_argument("--chat-template", default=d.chat_template, help="a Jinja template, or a file holding one")
    p.add_argument("--block-size", type=_positive_int, default=d.block_size, help="tokens per KV cache block")
    p.add_argument("--gpu-memory-utilization", type=_fraction, default=d.gpu_memory_utilization,
                   help="fraction of GPU memory for weights, activations and KV cache")
    p.add_argument("--kv-cache-memory-bytes", type=_byte_size, default=d.kv_cache_memory_bytes,
                   help="KV cache budget, e.g. 4GiB (overrides --gpu-memory-utilization; CPU default 1 GiB)")
    p.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=list(KV_CACHE_DTYPES),
                   help="auto: the model's dtype; fp8 (fp8_e4m3): K/V stored as FP8 E4M3 with scale 1.0, twice "
                        "the tokens in the same memory and half the bytes each decode reads (GPUs with FP8: "
                        "compute capability 8.9 or newer; and the CPU)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=d.enable_prefix_caching, help="reuse the KV cache of shared prompt prefixes")
    p.add_argument("--max-num-seqs", type=_positive_int, default=d.max_num_seqs,
                   help="most sequences running at once")
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=d.max_num_batched_tokens,
                   help="token budget of one engine step (default: 8192 on GPU, 2048 on CPU)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--max-cudagraph-capture-size", type=_positive_int, default=d.cuda_graph_max_batch,
                   help="largest decode batch captured as a CUDA graph (capped by --max-num-seqs); larger decode "
                        "batches run eagerly")
    p.add_argument("--compile-cache-dir", default=d.compile_cache_dir, metavar="DIR",
                   help="keep Triton's compiled kernels here (TRITON_CACHE_DIR), e.g. on a volume, so later "
                        "launches skip the JIT compilation")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="queue each step (decodes and prefill chunks) before reading back the previous one's "
                        "tokens, so host work overlaps the GPU (default: on with CUDA)")
    p.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, default=d.tensor_parallel_size,
                   help="processes (one per GPU) to shard the model over")


def add_serve(sub: Subparsers) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve a model over an OpenAI-compatible HTTP API (vLLM's flags).",
                       formatter_class=_HelpFormatter)
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=_port, default=8000, help="0 picks a free port")
    p.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' on the API routes (repeat for several keys; "
                        "default: $EMBER_API_KEY)")
    p.add_argument("--public-endpoints", nargs="*", default=list(PUBLIC_ENDPOINTS), choices=PUBLIC_ENDPOINTS,
                   metavar="NAME", help=f"of {', '.join(PUBLIC_ENDPOINTS)}: those that need no API key")
    p.add_argument("--allowed-origins", type=_str_list, default=["*"],
                   help='CORS origins, a JSON list or comma-separated (default: ["*"])')
    p.add_argument("--allowed-methods", type=_str_list, default=["*"], help='CORS methods (default: ["*"])')
    p.add_argument("--allowed-headers", type=_str_list, default=["*"], help='CORS headers (default: ["*"])')
    p.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    p.add_argument("--max-queue-len", type=_non_negative_int, default=None,
                   help="sequences that may wait beyond --max-num-seqs; past that, 429 at once (default: no cap)")
    p.add_argument("--request-timeout", type=_seconds, default=None,
                   help="seconds a request may take, queue included; past that it is aborted with 504 "
                        "(default: no limit)")
    p.add_argument("--max-request-body-bytes", type=_byte_size, default=16 * 2**20,
                   help="larger request bodies get 413, e.g. 16MiB")
    p.add_argument("--graceful-shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests get to finish")
    p.add_argument("--tool-call-parser", default="auto", choices=TOOL_CALL_PARSERS,
                   help="how tool_choice 'auto' reads calls out of chat output; auto: detected from the chat "
                        "template (hermes unless it is Llama 3.1's)")
    # vLLM refuses tool_choice "auto" without this flag; ember always allows it, so vLLM command lines that
    # carry the flag must still start. It changes nothing.
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM compatibility; auto tool choice is always on")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run the engine's step loop in a process of its own, so that HTTP work never holds the "
                        "GIL it needs (default: on with a GPU, off on a CPU)")
    p.add_argument("--disable-log-requests", action="store_true", help="no structured line per API request")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"], help="HTTP server logging")
    p.add_argument("--disable-uvicorn-access-log", action="store_true", help="no line per HTTP request")
    p.set_defaults(handler=run_serve)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        revision=args.revision,
        tokenizer=args.tokenizer,
        load_format=args.load_format,
        dtype=args.dtype,
        quantization=args.quantization,
        device=args.device,
        seed=args.seed,
        max_model_len=args.max_model_len,
        chat_template=args.chat_template,
        block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        kv_cache_dtype=args.kv_cache_dtype,
        enable_prefix_caching=args.enable_prefix_caching,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager,
        cuda_graph_max_batch=args.max_cudagraph_capture_size,
        async_scheduling=args.async_scheduling,
        compile_cache_dir=args.compile_cache_dir,
        tensor_parallel_size=args.tensor_parallel_size,
        served_model_name=list(args.served_model_name or []),
    )


def api_keys_from_args(args: argparse.Namespace) -> list[str]:
    """`--api-key`s, else $EMBER_API_KEY, else none."""
    env_key = os.environ.get("EMBER_API_KEY")
    return list(args.api_key) if args.api_key else ([env_key] if env_key else [])


def served_model_names(args: argparse.Namespace) -> list[str]:
    # vLLM's default served name is the model argument as given.
    return list(args.served_model_name or [args.model or EMBEDDED_MODEL])


def server_config_from_args(args: argparse.Namespace) -> Any:
    from ember.server.config import ServerConfig

    return ServerConfig(host=args.host, port=args.port, served_model_names=served_model_names(args),
                        api_keys=api_keys_from_args(args),
                        public_endpoints=list(args.public_endpoints), allowed_origins=args.allowed_origins,
                        allowed_methods=args.allowed_methods, allowed_headers=args.allowed_headers,
                        allow_credentials=args.allow_credentials, max_num_seqs=args.max_num_seqs,
                        max_queue_len=args.max_queue_len, request_timeout_s=args.request_timeout,
                        max_request_body_bytes=args.max_request_body_bytes,
                        graceful_shutdown_timeout_s=args.graceful_shutdown_timeout,
                        log_requests=not args.disable_log_requests, uvicorn_log_level=args.uvicorn_log_level,
                        access_log=not args.disable_uvicorn_access_log, tool_call_parser=args.tool_call_parser,
                        engine_process=args.engine_process)


def _seconds_since_process_start() -> float | None:
    """From /proc (Linux): how long the interpreter and imports took before ember's own code ran."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_serve(args: argparse.Namespace) -> int:
    from ember.server.launcher import run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    since_start = _seconds_since_process_start()
    if since_start is not None:  # the cold-start breakdown begins here
        logging.getLogger("ember.cli").info("process start to serve: %.2f s (interpreter and imports)",
                                            since_start)
    return run_server(engine_config_from_args(args), server_config_from_args(args))


# --------------------------------------------------------------------------- client tools (chat, smoke)


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="served model name (default: the server's first)")
    p.add_argument("--api-key", default=None, help="default: $EMBER_API_KEY, else none")
    p.add_argument("--max-tokens", type=_positive_int, default=None)


def _client(url: str, api_key: str | None) -> Any:
    import openai

    key = api_key or os.environ.get("EMBER_API_KEY") or "EMPTY"
    return openai.OpenAI(base_url=_base_url(url) + "/v1", api_key=key, max_retries=0)


def _first_model(client: Any) -> str:
    return client.models.list().data[0].id


def add_chat(sub: Subparsers) -> None:
    p = sub.add_parser("chat", help="chat with a running server in the terminal (streaming)")
    p.add_argument("url", nargs="?", default=DEFAULT_URL, help="server URL (with or without /v1)")
    p.add_argument("--system-prompt", default=None)
    _add_client_flags(p)
    p.set_defaults(handler=run_chat)


def run_chat(args: argparse.Namespace, input_fn: Callable[[str], str] = input) -> int:
    import openai

    client = _client(args.url, args.api_key)
    try:
        model = args.model or _first_model(client)
    except openai.APIError as e:
        print(f"cannot reach {args.url}: {e}", file=sys.stderr)
        return 1
    messages: list[dict[str, str]] = []
    if args.system_prompt:
        messages.append({"role": "system", "content": args.system_prompt})
    print(f"chatting with {model} at {args.url} (Ctrl-D to quit, Ctrl-C to interrupt an answer)")
    while True:
        try:
            line = input_fn("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            stream = client.chat.completions.create(model=model, messages=messages, stream=True,
                                                    max_tokens=args.max_tokens)
            with stream:  # leaving early closes the connection, which aborts the request on the server
                for chunk in stream:
                    for choice in chunk.choices:
                        piece = choice.delta.content or ""
                        reply.append(piece)
                        print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [interrupted]", end="")
        except openai.APIError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def add_smoke(sub: Subparsers) -> None:
    p = sub.add_parser("smoke", help="check a running server end to end (exit code 0 = pass)",
                       description="Wait for /health, then stream two chats, checking every chunk.")
    p.add_argument("url", help="server URL (with or without /v1)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for /health")
    _add_client_flags(p)
    p.set_defaults(handler=run_smoke, max_tokens=256)


def _wait_healthy(base: str, timeout: float) -> bool:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=5.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass  # not listening yet
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def _smoke_chat(client: Any, model: str, system: str, user: str, max_tokens: int) -> str:
    """Stream one chat; raise AssertionError on anything a conforming server would not send."""
    stream = client.chat.completions.create(
        model=model, stream=True, max_tokens=max_tokens,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user}])
    text, ids, finish, chunks = [], set(), None, 0
    with stream:
        for chunk in stream:
            chunks += 1
            assert chunk.object == "chat.completion.chunk", f"chunk object is {chunk.object!r}"
            ids.add(chunk.id)
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                print(choice.delta.content or "", end="", flush=True)
                finish = choice.finish_reason or finish
    print()
    assert chunks > 0, "the stream had no chunks"
    assert len(ids) == 1, f"chunks carry different ids: {sorted(ids)}"
    assert "".join(text).strip(), "the reply is empty"
    assert finish in ("stop", "length"), f"finish_reason is {finish!r}"
    return "".join(text)


def run_smoke(args: argparse.Namespace) -> int:
    import openai

    base = _base_url(args.url)
    if not _wait_healthy(base, args.timeout):
        print(f"FAIL: {base}/health did not answer 200 within {args.timeout:g} s", file=sys.stderr)
        return 1
    client = _client(base, args.api_key)
    try:
        model = args.model or _first_model(client)
        for system, user in SMOKE_CHATS:
            print(f"--- {system}\n>>> {user}")
            _smoke_chat(client, model, system, user, args.max_tokens)
    except (AssertionError, openai.APIError) as e:
        print(f"FAIL: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"PASS: {len(SMOKE_CHATS)} streamed chats from {model} at {base}")
    return 0


# --------------------------------------------------------------------------- entry point

def add_bench_commands(sub: Subparsers) -> None:
    from ember.bench.cli import add_bench

    add_bench(sub, add_engine_args, engine_config_from_args)


def add_deploy(sub: Subparsers) -> None:
    # ember.deploy.ray_serve imports ray only when the command runs, so `ember --help` works without it.
    from ember.deploy.ray_serve import add_ray_parser

    p = sub.add_parser("deploy", help="run the server on a serving platform (ray: Ray Serve)")
    targets = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    add_ray_parser(targets)


SUBCOMMANDS: list[Callable[[Subparsers], None]] = [add_serve, add_chat, add_smoke, add_bench_commands, add_deploy]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="ember: an OpenAI-compatible LLM server")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
