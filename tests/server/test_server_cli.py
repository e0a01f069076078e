"""`ember serve | chat | smoke` and examples/client.py, run as a user runs them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_log import read_until

from ember.cli import build_parser, engine_config_from_args, main, run_chat, server_config_from_args
from ember.config import EMBEDDED_MODEL, EngineConfig

ROOT = Path(__file__).resolve().parents[2]
# The console script that scripts/setup.sh installs, as the README runs it.
EMBER = [str(Path(sys.executable).parent / "ember")]


def test_serve_flags_map_to_engine_config() -> None:
    args = build_parser().parse_args([
        "serve", "some/model", "--revision", "abc", "--tokenizer", "tokdir", "--served-model-name", "some/model", "llm",
        "--host", "0.0.0.0", "--port", "9000", "--enforce-eager", "--tensor-parallel-size", "2",
        "--max-model-len", "4096", "--gpu-memory-utilization", "0.8", "--max-num-seqs", "32",
        "--max-num-batched-tokens", "4096", "--api-key", "k1", "--api-key", "k2", "--dtype", "bfloat16",
        "--load-format", "safetensors", "--seed", "7", "--chat-template", "tmpl.jinja", "--block-size", "32",
        "--device", "cuda", "--kv-cache-memory-bytes", "4GiB", "--no-enable-prefix-caching",
        "--no-async-scheduling", "--compile-cache-dir", "/vol/jit", "--kv-cache-dtype", "fp8",
        "--max-cudagraph-capture-size", "384"])
    cfg = engine_config_from_args(args)
    assert cfg == EngineConfig(
        model="some/model", revision="abc", tokenizer="tokdir", load_format="safetensors", dtype="bfloat16",
        device="cuda", seed=7,
        max_model_len=4096, chat_template="tmpl.jinja", block_size=32, gpu_memory_utilization=0.8,
        kv_cache_memory_bytes=4 * 2**30, enable_prefix_caching=False, max_num_seqs=32,
        max_num_batched_tokens=4096, enforce_eager=True, tensor_parallel_size=2,
        served_model_name=["some/model", "llm"], async_scheduling=False, compile_cache_dir="/vol/jit",
        kv_cache_dtype="fp8", cuda_graph_max_batch=384)
    srv = server_config_from_args(args)
    assert (srv.host, srv.port, srv.api_keys) == ("0.0.0.0", 9000, ["k1", "k2"])
    assert srv.served_model_names == ["some/model", "llm"]


def test_serve_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBER_API_KEY", raising=False)
    args = build_parser().parse_args(["serve"])
    assert engine_config_from_args(args) == EngineConfig()  # no flag: the engine's own defaults
    srv = server_config_from_args(args)
    assert (srv.host, srv.port, srv.api_keys) == ("127.0.0.1", 8000, [])
    assert srv.served_model_names == [EMBEDDED_MODEL]
    monkeypatch.setenv("EMBER_API_KEY", "from-env")
    assert server_config_from_args(build_parser().parse_args(["serve"])).api_keys == ["from-env"]


def test_engine_process_flag_and_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from ember.server import launcher
    from ember.server.launcher import cuda_present, use_engine_process

    parse = build_parser().parse_args
    assert server_config_from_args(parse(["serve"])).engine_process is None
    assert server_config_from_args(parse(["serve", "--engine-process"])).engine_process is True
    assert server_config_from_args(parse(["serve", "--no-engine-process"])).engine_process is False
    # Unset: its own process where the engine runs on a GPU, the server's on a CPU; a flag always wins.
    assert use_engine_process(None, "cuda") and use_engine_process(None, "cuda:1")
    assert not use_engine_process(None, "cpu")
    assert not use_engine_process(False, "cuda") and use_engine_process(True, "cpu")
    monkeypatch.setattr(launcher, "cuda_present", lambda: True)
    assert use_engine_process(None, "auto")
    monkeypatch.setattr(launcher, "cuda_present", lambda: False)
    assert not use_engine_process(None, "auto")
    monkeypatch.undo()
    # Device nodes decide (not /proc/driver/nvidia, which a container given no GPU may still show) ...
    devices = ["null", "nvidia0", "nvidiactl"]
    monkeypatch.setattr(os, "listdir", lambda path: devices if path == "/dev" else [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert cuda_present()
    for visible in ("0", "1,0", "GPU-8e6d", "MIG-1f2a"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert cuda_present()
    # ... unless CUDA_VISIBLE_DEVICES hides them all: CUDA stops at its first entry that names no device.
    for hidden in ("", "-1", "NoDevFiles", "none,0"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert not cuda_present()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    devices[:] = ["null", "nvidiactl", "nvidia-uvm"]  # the driver's control nodes without a GPU
    assert not cuda_present()


@pytest.mark.parametrize("argv", [["serve", "--port", "70000"], ["serve", "--gpu-memory-utilization", "1.5"],
                                  ["serve", "--max-num-seqs", "0"], ["serve", "--kv-cache-memory-bytes", "lots"],
                                  ["serve", "--kv-cache-dtype", "fp8_e5m2"],
                                  ["serve", "--dtype", "int3"], ["nonsense"], []])
def test_bad_cli_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_tool_call_parser_flag_reaches_server_config(capsys: pytest.CaptureFixture[str]) -> None:
    from ember.server.config import TOOL_CALL_PARSERS, ServerConfig
    from ember.structured.tool_parsers import TOOL_PARSERS

    assert TOOL_CALL_PARSERS == ("auto", *TOOL_PARSERS)  # the CLI's choices are the parsers that exist
    assert server_config_from_args(build_parser().parse_args(["serve"])).tool_call_parser == "auto"
    for name in TOOL_CALL_PARSERS:
        args = build_parser().parse_args(["serve", "--tool-call-parser", name, "--enable-auto-tool-choice"])
        assert server_config_from_args(args).tool_call_parser == name
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--tool-call-parser", "mistral"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'mistral'" in err and all(repr(n) in err for n in TOOL_CALL_PARSERS), err
    with pytest.raises(ValueError, match="unknown tool call parser 'mistral'"):
        ServerConfig(tool_call_parser="mistral")


def test_smoke_passes_against_the_server(live_server: Any) -> None:
    r = subprocess.run([*EMBER, "smoke", live_server.url + "/v1", "--max-tokens", "12", "--timeout", "30"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout


def test_smoke_fails_without_a_server() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    r = subprocess.run([*EMBER, "smoke", f"http://127.0.0.1:{port}", "--timeout", "1"], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1
    assert "FAIL" in r.stderr


def test_smoke_fails_on_a_wrong_model(live_server: Any) -> None:
    r = subprocess.run([*EMBER, "smoke", live_server.url, "--model", "gpt-4", "--timeout", "10"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 1 and "NotFoundError" in r.stderr


def test_chat_command(live_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    lines = iter(["Hello!", "", "And again?"])

    def fake_input(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    args = build_parser().parse_args(["chat", live_server.url, "--max-tokens", "6", "--system-prompt", "Be nice"])
    assert run_chat(args, input_fn=fake_input) == 0
    out = capsys.readouterr().out
    assert f"chatting with {EMBEDDED_MODEL}" in out
    assert len([line for line in out.splitlines() if line.strip()]) >= 3  # banner and two replies


def test_example_client(live_server: Any) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "client.py"), live_server.url, "--max-tokens", "8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for label in ("model:", "chat:", "stream:", "completion:", "first token"):
        assert label in r.stdout


TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}:{{ m['content'] }}>>{% endfor %}"


def test_ember_serve_process() -> None:
    """`ember serve` end to end in its own process: one ready line with the URL, served names, API key, chat
    template, clean exit on SIGTERM."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("EMBER_API_KEY", None)
    proc = subprocess.Popen([*EMBER, "serve", "--port", "0", "--served-model-name", "mine", "other",
                             "--max-model-len", "512", "--kv-cache-memory-bytes", "64MiB", "--api-key", "sesame",
                             "--chat-template", TEMPLATE],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=ROOT, env=env)
    try:
        m, log = read_until(proc, r"ember ready in .* at (http://127\.0\.0\.1:\d+)/v1", timeout=300)
        assert m is not None, log
        url = m.group(1)
        assert log.count("ember ready") == 1
        assert "Uvicorn running" not in log  # the ready line is the one that tells the URL
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 401
        auth = {"Authorization": "Bearer sesame"}
        models = httpx.get(f"{url}/v1/models", headers=auth).json()["data"]
        assert [x["id"] for x in models] == ["mine", "other"] and models[0]["max_model_len"] == 512
        r = httpx.post(f"{url}/v1/completions", json={"model": "other", "prompt": "Hi", "max_tokens": 2},
                       headers=auth, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "other"
        ids = httpx.post(f"{url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]},
                         headers=auth).json()["tokens"]
        text = httpx.post(f"{url}/detokenize", json={"tokens": ids}, headers=auth).json()["prompt"]
        assert text == "<<user:hi>>"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ember_serve_busy_port_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        start = time.monotonic()
        r = subprocess.run([*EMBER, "serve", "--port", str(port)], capture_output=True, text=True, timeout=120,
                           cwd=ROOT)
    assert r.returncode == 1
    assert "cannot listen" in r.stderr
    assert time.monotonic() - start < 30  # before any model load


def test_ember_serve_missing_model_exits_1() -> None:
    r = subprocess.run([*EMBER, "serve", "/no/such/model/dir", "--port", "0"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 1
    assert "the engine failed to start" in r.stderr
