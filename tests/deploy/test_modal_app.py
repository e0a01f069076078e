"""The Modal app (`ember/deploy/modal_app.py`), offline: settings from the environment, the `ember serve` command line
read back by ember's own parser, readiness, and the app's definition as far as Modal shows it without its cloud.
Nothing here deploys: this machine cannot reach Modal."""

from __future__ import annotations

import importlib
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("modal")

import modal  # noqa: E402

from ember.cli import api_keys_from_args, build_parser, engine_config_from_args  # noqa: E402
from ember.deploy import modal_app  # noqa: E402

DEFAULT_MODEL = "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8"


def _settings(**env: str) -> Any:
    return modal_app.Settings.from_env(env)


def _parse(cmd: list[str]) -> Any:
    """The server's argv as `ember serve` reads it; an unknown flag or bad value fails the test here."""
    assert cmd[:4] == [sys.executable, "-m", "ember", "serve"]
    return build_parser().parse_args(cmd[3:])


@pytest.fixture
def load_app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """Re-import the module with exactly the given EMBER_* variables, no Modal credentials or config, and no network
    (any outgoing connection fails the import)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"importing the Modal app tried to connect: {args}")

    def load(**env: str) -> ModuleType:
        import os

        for name in list(os.environ):
            if name.startswith(("EMBER_", "MODAL_")):
                monkeypatch.delenv(name)
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.modal.toml
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with monkeypatch.context() as m:
            m.setattr(socket.socket, "connect", refuse)
            m.setattr(socket, "create_connection", refuse)
            return importlib.reload(modal_app)

    yield load
    monkeypatch.undo()
    importlib.reload(modal_app)  # back to this process's own environment for the other tests


# --------------------------------------------------------------------------- settings


def test_defaults_follow_the_recipe() -> None:
    s = _settings()
    assert s == modal_app.Settings()
    assert (s.app_name, s.model, s.gpu, s.n_gpu, s.fast_boot) == ("ember", DEFAULT_MODEL, "H100", 1, True)
    # A pinned commit of the default checkpoint, so a push to the repository cannot change what replicas load.
    assert s.revision is not None and len(s.revision) == 40 and int(s.revision, 16) >= 0
    assert s.served_model_names == (DEFAULT_MODEL, "llm")
    assert (s.max_inputs, s.scaledown_s, s.min_containers, s.max_containers) == (32, 900, 0, None)
    assert (s.timeout_s, s.startup_timeout_s) == (600, 1200)
    assert (s.api_key_secret, s.hf_secret, s.serve_args) == (None, None, ())
    assert s.gpu_spec == "H100"


def test_overrides() -> None:
    s = _settings(EMBER_APP_NAME="ember-qwen", EMBER_MODEL="Qwen/Qwen2.5-7B-Instruct", EMBER_REVISION="v1.0",
                  EMBER_SERVED_MODEL_NAME="qwen, chat  assistant", EMBER_GPU="A100-80GB", EMBER_N_GPU="2",
                  EMBER_FAST_BOOT="false", EMBER_MAX_INPUTS="8", EMBER_SCALEDOWN_S="60", EMBER_MIN_CONTAINERS="1",
                  EMBER_MAX_CONTAINERS="4", EMBER_TIMEOUT_S="120", EMBER_STARTUP_TIMEOUT_S="900",
                  EMBER_API_KEY_SECRET="ember-key", EMBER_HF_SECRET="hf", EMBER_SERVE_ARGS="--max-model-len 8192")
    assert s == modal_app.Settings(
        app_name="ember-qwen", model="Qwen/Qwen2.5-7B-Instruct", revision="v1.0",
        served_model_names=("qwen", "chat", "assistant"), gpu="A100-80GB", n_gpu=2, fast_boot=False, max_inputs=8,
        scaledown_s=60, min_containers=1, max_containers=4, timeout_s=120, startup_timeout_s=900,
        api_key_secret="ember-key", hf_secret="hf", serve_args=("--max-model-len", "8192"))
    assert s.gpu_spec == "A100-80GB:2"
    # The settings reach the containers as variables: they must read back to the same thing.
    assert modal_app.Settings.from_env(s.to_env()) == s
    assert modal_app.Settings.from_env(modal_app.Settings().to_env()) == modal_app.Settings()


def test_revision_pin_belongs_to_the_default_model() -> None:
    # Another model: its main branch, not the default checkpoint's commit.
    other = _settings(EMBER_MODEL="Qwen/Qwen2.5-7B-Instruct")
    assert other.revision is None and other.served_model_names == ("Qwen/Qwen2.5-7B-Instruct", "llm")
    assert _settings(EMBER_MODEL=DEFAULT_MODEL).revision == modal_app.DEFAULT_REVISION
    assert _settings(EMBER_REVISION="").revision is None  # explicitly unpinned


@pytest.mark.parametrize("env, message", [
    ({"EMBER_N_GPU": "two"}, "EMBER_N_GPU must be an integer, got 'two'"),
    ({"EMBER_N_GPU": "0"}, "EMBER_N_GPU must be at least 1, got 0"),
    ({"EMBER_MAX_INPUTS": "0"}, "EMBER_MAX_INPUTS must be at least 1"),
    ({"EMBER_FAST_BOOT": "maybe"}, "EMBER_FAST_BOOT must be one of"),
    ({"EMBER_SCALEDOWN_S": "1"}, "EMBER_SCALEDOWN_S must be between 2 and 3600, got 1"),
    ({"EMBER_SCALEDOWN_S": "7200"}, "EMBER_SCALEDOWN_S must be between 2 and 3600"),
    ({"EMBER_MIN_CONTAINERS": "-1"}, "EMBER_MIN_CONTAINERS must be at least 0"),
    ({"EMBER_MIN_CONTAINERS": "3", "EMBER_MAX_CONTAINERS": "2"}, "EMBER_MAX_CONTAINERS (2) must be at least"),
    ({"EMBER_GPU": "H100:2"}, "give the count in EMBER_N_GPU"),
    ({"EMBER_SERVE_ARGS": "--port 9000"}, "EMBER_SERVE_ARGS may not set --port"),
    ({"EMBER_SERVE_ARGS": "--host=1.2.3.4"}, "EMBER_SERVE_ARGS may not set --host"),
    ({"EMBER_SERVE_ARGS": "--api-key secret"}, "may not set --api-key"),
    ({"EMBER_SERVE_ARGS": "-tp 2"}, "may not set -tp"),
    ({"EMBER_SERVE_ARGS": "'--max-model-len"}, "cannot be split"),
    # ember's own parser refuses these, at deploy time rather than on a GPU.
    ({"EMBER_SERVE_ARGS": "--max-model-len banana"}, "ember does not accept"),
    ({"EMBER_SERVE_ARGS": "--no-such-flag"}, "unrecognized arguments: --no-such-flag"),
])
def test_bad_values_are_refused_clearly(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as e:
        _settings(**env)
    assert message in str(e.value)


# --------------------------------------------------------------------------- the ember serve command line


def test_serve_command_fast_boot_is_eager() -> None:
    s = _settings()
    cmd = modal_app.serve_command(s)
    args = _parse(cmd)
    assert args.model == DEFAULT_MODEL and args.revision == s.revision
    assert args.served_model_name == [DEFAULT_MODEL, "llm"]
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    assert args.enforce_eager is True
    assert args.compile_cache_dir == modal_app.TRITON_CACHE_DIR
    assert args.compile_cache_dir.startswith(modal_app.EMBER_CACHE_DIR + "/")  # on the cache volume
    assert args.tensor_parallel_size == 1
    assert args.api_key is None  # no key on the command line, ever
    config = engine_config_from_args(args)
    assert (config.model, config.enforce_eager, config.tensor_parallel_size) == (DEFAULT_MODEL, True, 1)


def test_serve_command_compiled() -> None:
    cmd = modal_app.serve_command(_settings(EMBER_FAST_BOOT="0", EMBER_REVISION=""))
    assert "--enforce-eager" not in cmd and "--revision" not in cmd
    args = _parse(cmd)
    assert args.enforce_eager is False and args.revision is None
    assert engine_config_from_args(args).enforce_eager is False  # CUDA graphs


def test_serve_command_extra_args_pass_through() -> None:
    args = _parse(modal_app.serve_command(_settings(
        EMBER_SERVE_ARGS="--max-model-len 8192 --max-num-seqs 64 --kv-cache-memory-bytes 20GiB")))
    assert (args.max_model_len, args.max_num_seqs, args.kv_cache_memory_bytes) == (8192, 64, 20 * 2**30)


def test_n_gpus_become_tensor_parallel_ranks() -> None:
    s = _settings(EMBER_N_GPU="2")
    assert s.gpu_spec == "H100:2" and modal_app.function_options(s)["gpu"] == "H100:2"
    args = _parse(modal_app.serve_command(s))
    assert engine_config_from_args(args).tensor_parallel_size == 2


def test_api_key_comes_from_the_secret_not_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _settings(EMBER_API_KEY_SECRET="ember-key")
    cmd = modal_app.serve_command(s)
    assert cmd == modal_app.serve_command(_settings())  # the same command line, with or without a key
    # In the container the Secret sets EMBER_API_KEY, which `ember serve` reads when --api-key is absent.
    monkeypatch.setenv("EMBER_API_KEY", "sk-test")
    env = modal_app.server_env({"EMBER_API_KEY": "sk-test"})
    assert env["EMBER_API_KEY"] == "sk-test"
    assert api_keys_from_args(_parse(cmd)) == ["sk-test"]


def test_server_env() -> None:
    env = modal_app.server_env({"PATH": "/usr/bin", "PYTHONPATH": "/extra"})
    root = env["PYTHONPATH"].split(":")[0]
    assert (Path(root) / "ember" / "__init__.py").is_file() and env["PYTHONPATH"].endswith(":/extra")
    assert env["HF_HUB_OFFLINE"] == "1" and env["PATH"] == "/usr/bin"


def test_download_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append((a, k)) or "/snap")
    assert modal_app.download_weights(_settings()) == "/snap"
    (args, kwargs), = calls
    assert args == (DEFAULT_MODEL,) and kwargs["revision"] == modal_app.DEFAULT_REVISION
    assert "original/*" in kwargs["ignore_patterns"] and "*.safetensors" not in kwargs["ignore_patterns"]


# --------------------------------------------------------------------------- readiness


class _Health(BaseHTTPRequestHandler):
    answers: list[int] = []
    auth: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.auth.append(self.headers.get("Authorization"))
        code = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[str, type[_Health]]]:
    handler = type("Health", (_Health,), {"answers": [], "auth": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/health", handler
    server.shutdown()
    server.server_close()


@pytest.fixture
def running() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_ready_waits_through_503(health_server: tuple[str, type[_Health]], running: subprocess.Popen[bytes]) -> None:
    url, handler = health_server
    handler.answers[:] = [503, 503, 200]
    modal_app.wait_until_ready(url, running, timeout_s=30, api_key="sk-test", poll_s=0.05)
    assert len(handler.auth) == 3 and set(handler.auth) == {"Bearer sk-test"}


def test_ready_times_out(health_server: tuple[str, type[_Health]], running: subprocess.Popen[bytes]) -> None:
    url, handler = health_server
    handler.answers[:] = [503]
    with pytest.raises(TimeoutError, match="not ready"):
        modal_app.wait_until_ready(url, running, timeout_s=0.3, poll_s=0.05)


def test_ready_fails_when_the_server_exits() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    # Nothing listens on this port: only the exit can end the wait before its (long) timeout.
    with pytest.raises(RuntimeError, match="exited with code 3"):
        modal_app.wait_until_ready("http://127.0.0.1:9/health", proc, timeout_s=60, poll_s=0.05)


# --------------------------------------------------------------------------- the image's copy of ember


def test_package_data_matches_pyproject() -> None:
    pyproject = tomllib.loads(modal_app.PYPROJECT.read_text())
    assert tuple(pyproject["tool"]["setuptools"]["package-data"]["ember"]) == modal_app.PACKAGE_DATA


def test_source_files_in_the_image() -> None:
    package = Path(modal_app.__file__).resolve().parents[1]
    files = [p.relative_to(package) for p in package.rglob("*") if p.is_file()]
    kept = {p.as_posix() for p in files if modal_app.keep_source_file(p)}
    assert {"configs/llama-3.1-8b-instruct.json", "configs/tiny-llama.json", "templates/chatml_tools.jinja",
            "deploy/modal_app.py", "cli.py", "__main__.py"} <= kept
    assert all(p.endswith((".py", ".json", ".jinja")) for p in kept)
    assert not modal_app.keep_source_file(Path("__pycache__/cli.cpython-311.pyc"))
    assert not modal_app.keep_source_file(Path("server/__pycache__/app.cpython-311.py"))
    assert not modal_app.keep_source_file(Path("notes.md"))


# --------------------------------------------------------------------------- the Modal objects


def test_app_definition_defaults(load_app: Any) -> None:
    m = load_app()
    assert m.app.name == "ember"
    assert isinstance(m.serve, modal.Function) and m.serve.app is m.app
    # Function.info() is Modal's public description of a function; for one defined here it needs no network.
    info = m.serve.info()
    assert info.web_info is not None  # a web endpoint
    assert info.gpus == [("H100", 1)]
    assert {path: v.name for path, v in info.volumes.items()} == {
        "/root/.cache/huggingface": "huggingface-cache", "/root/.cache/ember": "ember-cache"}
    assert info.concurrency_info is not None and info.concurrency_info.max_inputs == 32
    assert (info.timeout, info.startup_timeout) == (600, 1200)
    # Only the settings' variables, no secret from a name: nothing to create in the workspace beforehand.
    assert len(info.secrets) == 1 and info.secrets[0].startswith("Secret.from_dict([EMBER_APP_NAME")
    assert m.function_options(m.SETTINGS) == {"gpu": "H100", "timeout": 600, "startup_timeout": 1200,
                                              "scaledown_window": 900, "min_containers": 0, "max_containers": None}


def test_app_definition_overrides(load_app: Any) -> None:
    m = load_app(EMBER_APP_NAME="ember-8b", EMBER_GPU="H200", EMBER_N_GPU="2", EMBER_MAX_INPUTS="8",
                 EMBER_API_KEY_SECRET="ember-key", EMBER_HF_SECRET="hf-token", EMBER_SCALEDOWN_S="120",
                 EMBER_MAX_CONTAINERS="3")
    assert m.app.name == "ember-8b"
    info = m.serve.info()
    assert info.gpus == [("H200", 2)]
    assert info.concurrency_info is not None and info.concurrency_info.max_inputs == 8
    assert any("ember-key" in s for s in info.secrets) and any("hf-token" in s for s in info.secrets)
    opts = m.function_options(m.SETTINGS)
    assert (opts["scaledown_window"], opts["max_containers"]) == (120, 3)


def test_bad_environment_fails_the_import(load_app: Any) -> None:
    with pytest.raises(ValueError, match="EMBER_MAX_INPUTS must be an integer"):
        load_app(EMBER_MAX_INPUTS="lots")


def test_local_api_key_without_secret_warns(load_app: Any) -> None:
    with pytest.warns(UserWarning, match="the endpoint is open"):
        load_app(EMBER_API_KEY="sk-test")
