"""Shared fixtures: the embedded model loaded once per test session, and one real server for the whole session:
`ember serve`'s own code path (CLI flags -> EmberServer -> uvicorn) on 127.0.0.1 and a free port, in a background
thread, serving the embedded SmolLM2 under two names (used by tests/server and tests/structured)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from ember.config import EMBEDDED_MODEL  # plain dataclasses: imports neither torch nor transformers

if TYPE_CHECKING:
    from ember.server.config import ServerConfig
    from ember.server.launcher import EmberServer

# Tests never touch the network: the Hugging Face hub is consulted from the local cache only. Set before
# anything imports transformers (ember modules are imported inside the fixtures for that reason).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smol_llm():
    from ember import LLM

    return LLM()


@pytest.fixture(scope="session")
def hf_smol():
    """HF transformers' own reading of the same GGUF: the reference implementation."""
    import functools

    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from ember.model.loader import embedded_gguf_path

    path = embedded_gguf_path()
    # transformers builds gguf's tensor-name map anew for every submodule it maps (~400 times, 8 s here); the map
    # depends only on the architecture and the layer count, so one per pair gives the same names.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


# --------------------------------------------------------------------------- tiny checkpoints


@dataclass(frozen=True)
class TinyCheckpoints:
    """The shipped tiny config (4 heads, 2 KV heads, 2 layers) with random weights in HF's layout: separate q/k/v
    and gate/up projections, as checkpoints on the Hub are. Tests edit the weights before writing them to break a
    checkpoint on purpose."""

    config: dict[str, Any]

    def weights(self, dtype: Any = None, std: float = 1.0, seed: int = 0) -> dict[str, Any]:
        import torch

        c = self.config
        h, inter = c["hidden_size"], c["intermediate_size"]
        kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
        shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "lm_head.weight": (c["vocab_size"], h),
                  "model.norm.weight": (h,)}
        for i in range(c["num_hidden_layers"]):
            pre = f"model.layers.{i}."
            shapes |= {pre + "input_layernorm.weight": (h,), pre + "post_attention_layernorm.weight": (h,),
                       pre + "self_attn.q_proj.weight": (h, h), pre + "self_attn.k_proj.weight": (kv, h),
                       pre + "self_attn.v_proj.weight": (kv, h), pre + "self_attn.o_proj.weight": (h, h),
                       pre + "mlp.gate_proj.weight": (inter, h), pre + "mlp.up_proj.weight": (inter, h),
                       pre + "mlp.down_proj.weight": (h, inter)}
        g = torch.Generator().manual_seed(seed)
        # Matrices scaled by `std`; norms keep unit-scale weights.
        return {n: (torch.randn(s, generator=g) * (std if len(s) > 1 else 1.0)).to(dtype or torch.float32)
                for n, s in shapes.items()}

    def write(self, d: Any, weights: dict[str, Any], shards: int = 2, tokenizer: bool = False) -> Any:
        """`weights` saved round-robin into `shards` safetensors files beside the config; returns `d`.

        `tokenizer`: also a word-level tokenizer with one token `<tN>` per id, so that the checkpoint loads
        without the embedded model's (a GPU machine may not have that package; token ids are what tests compare).
        """
        import json

        from safetensors.torch import save_file

        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(self.config))
        if tokenizer:
            from tokenizers import Tokenizer, models, pre_tokenizers

            vocab = {f"<t{i}>": i for i in range(self.config["vocab_size"])}
            tok = Tokenizer(models.WordLevel(vocab, unk_token="<t0>"))
            tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
            tok.save(str(d / "tokenizer.json"))
            c = self.config
            special = {"bos_token": f"<t{c['bos_token_id']}>", "eos_token": f"<t{c['eos_token_id']}>",
                       "unk_token": "<t0>"}
            (d / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", **special}))
        names = sorted(weights)
        for i in range(shards):
            save_file({n: weights[n] for n in names[i::shards]},
                      str(d / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"))
        return d


@pytest.fixture(scope="session")
def tiny_checkpoints() -> TinyCheckpoints:
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "ember/configs/tiny-llama.json"
    return TinyCheckpoints(json.loads(path.read_text()))


# --------------------------------------------------------------------------- live server

SERVE_ARGS = ["serve", "--served-model-name", EMBEDDED_MODEL, "llm", "--port", "0", "--max-model-len", "1024",
              "--kv-cache-memory-bytes", "256MiB", "--disable-uvicorn-access-log"]
if os.environ.get("EMBER_TEST_ENGINE_PROCESS") == "1":  # the whole HTTP suite through `--engine-process`
    SERVE_ARGS.insert(1, "--engine-process")
API_KEY = "test-key-123"
LOAD_TIMEOUT_S = 300  # the first run converts the GGUF tokenizer (~10 s); later runs load in about a second


@dataclass
class LiveServer:
    ember: EmberServer
    url: str  # http://127.0.0.1:PORT, no trailing slash
    keyed_url: str  # the same engine behind a second app that requires API_KEY

    @property
    def engine(self) -> Any:
        return self.ember.engine

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the server's event loop (where the engine lives) and wait for its result."""
        assert self.ember.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.ember.loop).result(timeout)

    def stats(self) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            return dict(self.engine.stats())

        return self.run(read())

    def wait_idle(self, timeout: float = 20.0) -> dict[str, Any]:
        """Poll until no request runs or waits and every KV block is free; return the last stats."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            idle = s["num_running"] == 0 and s["num_waiting"] == 0
            if idle and s["num_free_blocks"] == s["num_total_blocks"] or time.monotonic() > deadline:
                return s
            time.sleep(0.05)

    @contextlib.contextmanager
    def extra_app(self, config: ServerConfig) -> Iterator[tuple[str, FastAPI]]:
        """Another app with other server settings, on the same engine and event loop, while the block runs:
        yields its base URL and the app. Cheaper than a second server, which would load the model again."""
        from ember.server.app import build_app

        assert self.ember.loop is not None
        app = build_app(self.engine, config)
        sock = _free_socket()
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        serving = asyncio.run_coroutine_threadsafe(server.serve(sockets=[sock]), self.ember.loop)
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
        finally:
            server.should_exit = True
            serving.result(30)
            sock.close()


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture
def free_port() -> int:
    """A port of 127.0.0.1 that was free a moment ago (for a process that binds it itself)."""
    with _free_socket() as sock:
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def live_server() -> Iterator[LiveServer]:
    from ember.cli import build_parser, engine_config_from_args, server_config_from_args
    from ember.server.app import build_app
    from ember.server.config import ServerConfig
    from ember.server.launcher import EmberServer

    args = build_parser().parse_args(SERVE_ARGS)
    ember = EmberServer(engine_config_from_args(args), server_config_from_args(args))
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", asyncio.run(ember.serve())), daemon=True,
                              name="ember-test-server")
    thread.start()
    if not ember.ready.wait(LOAD_TIMEOUT_S):
        ember.stop()
        pytest.fail(f"the server did not become ready within {LOAD_TIMEOUT_S} s (exit code {result.get('rc')})")
    assert ember.url is not None

    # A second app on the same engine and loop, with an API key, for the authentication tests.
    keyed_app = build_app(ember.engine, ServerConfig(served_model_names=[EMBEDDED_MODEL, "llm"],
                                                     api_keys=[API_KEY, "second-key"]))
    sock = _free_socket()
    keyed = uvicorn.Server(uvicorn.Config(keyed_app, log_level="warning", access_log=False))
    assert ember.loop is not None
    asyncio.run_coroutine_threadsafe(keyed.serve(sockets=[sock]), ember.loop)
    keyed_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 10
    while not keyed.started and time.monotonic() < deadline:
        time.sleep(0.02)

    yield LiveServer(ember, ember.url, keyed_url)

    keyed.should_exit = True
    ember.stop()
    thread.join(timeout=30)
    sock.close()
    assert result.get("rc") == 0, f"the server exited with {result.get('rc')}"


@pytest.fixture(scope="session")
def api_key() -> str:
    """The key the second app (`LiveServer.keyed_url`) requires."""
    return API_KEY


@pytest.fixture(scope="session")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="EMPTY", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, timeout=120) as c:
        yield c


@pytest.fixture(autouse=True)
def _no_request_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test that used the server, the engine must be idle with all KV blocks free: a leak in one
    test (an un-aborted request, a held block) fails that test rather than a later one."""
    yield
    if "live_server" not in request.fixturenames:
        return
    server: LiveServer = request.getfixturevalue("live_server")
    s = server.wait_idle()
    assert s["num_running"] == 0 and s["num_waiting"] == 0, s
    assert s["num_free_blocks"] == s["num_total_blocks"], s
