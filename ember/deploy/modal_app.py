"""ember on Modal: `ember serve` in a GPU container behind a Modal web endpoint, scaled to zero when idle.

Deploy from the repository root with `modal deploy -m ember.deploy.modal_app`. The settings are `EMBER_*`
environment variables read when the module is imported (see `Settings.from_env`); `modal deploy` imports it
locally, and each container imports it again with the same values, which are handed to it as its environment.

The logic (settings, the `ember serve` command line, waiting for readiness) is in plain functions that need
neither Modal nor a GPU; the Modal objects at the bottom only wire them up.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import shlex
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import modal

import ember
from ember.cli import build_parser

DEFAULT_MODEL = "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8"
# A commit of DEFAULT_MODEL's repository, so a push to the repository cannot change what a new replica loads.
# Taken from Modal's public vLLM example, which serves the same checkpoint; not checked against the Hub here.
DEFAULT_REVISION = "12fd6884d2585dd4d020373e7f39f74507b31866"
PORT = 8000
# Inside the container. HF_HOME and ember's cache live on Volumes, so weights and compiled kernels outlive it.
HF_CACHE_DIR = "/root/.cache/huggingface"
EMBER_CACHE_DIR = "/root/.cache/ember"
TRITON_CACHE_DIR = f"{EMBER_CACHE_DIR}/triton"
HF_VOLUME = "huggingface-cache"
CACHE_VOLUME = "ember-cache"
# ember loads safetensors only: pickled weights and Meta's original consolidated checkpoints would double the
# download for nothing.
DOWNLOAD_IGNORE = ("*.pt", "*.pth", "*.bin", "original/*")
# The non-Python files ember needs at run time: pyproject.toml's package-data (a test keeps the two in step).
PACKAGE_DATA = ("configs/*.json", "templates/*.jinja")
# The directory holding the ember package: the checkout here, /root in the container.
SOURCE_ROOT = Path(ember.__file__).resolve().parents[1]
PYPROJECT = SOURCE_ROOT / "pyproject.toml"
# Flags serve_command sets from the settings; EMBER_SERVE_ARGS may not repeat them (the later one would win
# silently, or the settings' meaning would change behind them). Keys belong in a Modal Secret, not argv.
MANAGED_FLAGS = ("--host", "--port", "--revision", "--served-model-name", "--enforce-eager",
                 "--tensor-parallel-size", "-tp", "--compile-cache-dir", "--api-key")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


# --------------------------------------------------------------------------- settings


def _opt_int(environ: Mapping[str, str], name: str, low: int, high: int | None = None) -> int | None:
    """An integer variable in [low, high]; None when unset or empty."""
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < low or high is not None and value > high:
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _int(environ: Mapping[str, str], name: str, default: int, low: int, high: int | None = None) -> int:
    value = _opt_int(environ, name, low, high)
    return default if value is None else value


def _bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{name} must be one of {', '.join(_TRUE + _FALSE)}, got {raw!r}")


def _names(raw: str) -> tuple[str, ...]:
    return tuple(n for n in raw.replace(",", " ").split() if n)


@dataclass(frozen=True)
class Settings:
    """What to serve and how Modal scales it; each field has an `EMBER_*` variable (see `from_env`)."""

    app_name: str = "ember"
    model: str = DEFAULT_MODEL
    revision: str | None = DEFAULT_REVISION
    served_model_names: tuple[str, ...] = (DEFAULT_MODEL, "llm")
    gpu: str = "H100"
    n_gpu: int = 1
    fast_boot: bool = True
    max_inputs: int = 32
    scaledown_s: int = 15 * 60
    min_containers: int = 0
    max_containers: int | None = None
    timeout_s: int = 10 * 60
    startup_timeout_s: int = 20 * 60
    api_key_secret: str | None = None
    hf_secret: str | None = None
    serve_args: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Read the `EMBER_*` variables; raises ValueError naming the variable for a bad value."""
        e = environ
        model = e.get("EMBER_MODEL", "").strip() or DEFAULT_MODEL
        if "EMBER_REVISION" in e:
            revision = e["EMBER_REVISION"].strip() or None  # empty: the repository's main branch
        else:
            # The pinned commit belongs to the default model; another model's default is its main branch.
            revision = DEFAULT_REVISION if model == DEFAULT_MODEL else None
        gpu = e.get("EMBER_GPU", "").strip() or cls.gpu
        if ":" in gpu:
            raise ValueError(f"EMBER_GPU is a GPU type ({gpu!r}): give the count in EMBER_N_GPU")
        try:
            serve_args = tuple(shlex.split(e.get("EMBER_SERVE_ARGS", "")))
        except ValueError as err:
            raise ValueError(f"EMBER_SERVE_ARGS cannot be split like a shell command line: {err}") from None
        for arg in serve_args:
            if any(arg == f or arg.startswith(f + "=") for f in MANAGED_FLAGS):
                raise ValueError(f"EMBER_SERVE_ARGS may not set {arg.split('=')[0]}: it comes from another "
                                 "EMBER_* variable (or, for keys, from EMBER_API_KEY_SECRET)")
        min_containers = _int(e, "EMBER_MIN_CONTAINERS", cls.min_containers, 0)
        max_containers = _opt_int(e, "EMBER_MAX_CONTAINERS", 1)
        if max_containers is not None and max_containers < min_containers:
            raise ValueError(f"EMBER_MAX_CONTAINERS ({max_containers}) must be at least EMBER_MIN_CONTAINERS "
                             f"({min_containers})")
        settings = cls(
            app_name=e.get("EMBER_APP_NAME", "").strip() or cls.app_name,
            model=model,
            revision=revision,
            served_model_names=_names(e.get("EMBER_SERVED_MODEL_NAME", "")) or (model, "llm"),
            gpu=gpu,
            n_gpu=_int(e, "EMBER_N_GPU", cls.n_gpu, 1),
            fast_boot=_bool(e, "EMBER_FAST_BOOT", cls.fast_boot),
            max_inputs=_int(e, "EMBER_MAX_INPUTS", cls.max_inputs, 1),
            # Modal's own bounds for scaledown_window, checked here to name the variable.
            scaledown_s=_int(e, "EMBER_SCALEDOWN_S", cls.scaledown_s, 2, 3600),
            min_containers=min_containers,
            max_containers=max_containers,
            timeout_s=_int(e, "EMBER_TIMEOUT_S", cls.timeout_s, 1),
            startup_timeout_s=_int(e, "EMBER_STARTUP_TIMEOUT_S", cls.startup_timeout_s, 1),
            api_key_secret=e.get("EMBER_API_KEY_SECRET", "").strip() or None,
            hf_secret=e.get("EMBER_HF_SECRET", "").strip() or None,
            serve_args=serve_args,
        )
        check_serve_args(serve_command(settings)[3:])  # a typo in EMBER_SERVE_ARGS fails the deploy, not a GPU
        return settings

    def to_env(self) -> dict[str, str]:
        """The variables that make `from_env` return these settings again (handed to the containers)."""
        return {
            "EMBER_APP_NAME": self.app_name,
            "EMBER_MODEL": self.model,
            "EMBER_REVISION": self.revision or "",
            "EMBER_SERVED_MODEL_NAME": " ".join(self.served_model_names),
            "EMBER_GPU": self.gpu,
            "EMBER_N_GPU": str(self.n_gpu),
            "EMBER_FAST_BOOT": "1" if self.fast_boot else "0",
            "EMBER_MAX_INPUTS": str(self.max_inputs),
            "EMBER_SCALEDOWN_S": str(self.scaledown_s),
            "EMBER_MIN_CONTAINERS": str(self.min_containers),
            "EMBER_MAX_CONTAINERS": "" if self.max_containers is None else str(self.max_containers),
            "EMBER_TIMEOUT_S": str(self.timeout_s),
            "EMBER_STARTUP_TIMEOUT_S": str(self.startup_timeout_s),
            "EMBER_API_KEY_SECRET": self.api_key_secret or "",
            "EMBER_HF_SECRET": self.hf_secret or "",
            "EMBER_SERVE_ARGS": shlex.join(self.serve_args),
        }

    @property
    def gpu_spec(self) -> str:
        """Modal's `gpu=` value: the type, with the count when there are several."""
        return self.gpu if self.n_gpu == 1 else f"{self.gpu}:{self.n_gpu}"


# --------------------------------------------------------------------------- the server process


def serve_command(settings: Settings, python: str = sys.executable) -> list[str]:
    """argv that starts `ember serve` for `settings` in the container (`python -m ember`: the image has ember's
    source, not an installed `ember` script)."""
    cmd = [python, "-m", "ember", "serve", settings.model]
    if settings.revision:
        cmd += ["--revision", settings.revision]
    cmd += ["--served-model-name", *settings.served_model_names]
    # The container's one network interface is where Modal's proxy connects, so all addresses it is.
    cmd += ["--host", "0.0.0.0", "--port", str(PORT)]
    # Passed through so that ember itself refuses what it cannot do (today, more than one GPU).
    cmd += ["--tensor-parallel-size", str(settings.n_gpu)]
    cmd += ["--compile-cache-dir", TRITON_CACHE_DIR]
    if settings.fast_boot:
        cmd.append("--enforce-eager")
    return cmd + list(settings.serve_args)


def check_serve_args(args: list[str]) -> None:
    """Parse `ember ...` arguments with ember's own parser; ValueError with its message if it refuses them."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parsed = build_parser().parse_args(args)
    except SystemExit:
        raise ValueError(f"ember does not accept `{shlex.join(args)}`: {err.getvalue().strip()}") from None
    if parsed.command != "serve":
        raise ValueError(f"not an `ember serve` command line: {shlex.join(args)}")


def server_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The server's environment: ember's source on the path, and the Hub off (the weights are already here)."""
    env = dict(environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SOURCE_ROOT), env.get("PYTHONPATH", "")) if p)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def wait_until_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float,
                     api_key: str | None = None, poll_s: float = 1.0) -> None:
    """Block until `url` (the server's /health) answers 200. ember listens before its model has loaded and answers
    503 meanwhile, while Modal routes requests as soon as the port accepts connections: waiting here keeps the
    first requests of a cold start queued at Modal instead of failing with 503."""
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    while True:
        code = process.poll()
        if code is not None:
            raise RuntimeError(f"ember serve exited with code {code} before it was ready (its log is above)")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=poll_s + 4) as r:
                if r.status == 200:
                    return
        except (OSError, http.client.HTTPException):
            pass  # not listening yet, or 503 while the model loads
        if time.monotonic() >= deadline:
            raise TimeoutError(f"ember serve was not ready at {url} within {timeout_s:g} s")
        time.sleep(poll_s)


def download_weights(settings: Settings) -> str:
    """Fetch the model's snapshot into the Hugging Face cache (a Volume); files already there are skipped."""
    from huggingface_hub import snapshot_download

    return snapshot_download(settings.model, revision=settings.revision, ignore_patterns=list(DOWNLOAD_IGNORE))


def function_options(settings: Settings) -> dict[str, Any]:
    """The plain-value arguments of `app.function` (the image, volumes and secrets are Modal objects)."""
    return {
        "gpu": settings.gpu_spec,
        "timeout": settings.timeout_s,  # per request
        # The download, the model load and CUDA graph capture all happen before the container takes a request.
        "startup_timeout": settings.startup_timeout_s,
        "scaledown_window": settings.scaledown_s,
        "min_containers": settings.min_containers,
        "max_containers": settings.max_containers,
    }


def keep_source_file(path: Path) -> bool:
    """Whether a file of the ember package (path relative to it) goes into the container: Python source and
    the package data, no bytecode or dot-files."""
    p = PurePosixPath(path.as_posix())
    if any(part == "__pycache__" or part.startswith(".") for part in p.parts):
        return False
    return p.suffix == ".py" or any(p.match(pattern) for pattern in PACKAGE_DATA)


# --------------------------------------------------------------------------- Modal objects

SETTINGS = Settings.from_env(os.environ)

if modal.is_local() and not PYPROJECT.is_file():
    # The image's dependencies are read from it: an installed ember (no checkout) cannot be deployed.
    raise RuntimeError(f"deploy ember from a checkout of its repository: {PYPROJECT} is missing")

if modal.is_local() and os.environ.get("EMBER_API_KEY") and not SETTINGS.api_key_secret:
    warnings.warn("EMBER_API_KEY is set here but the deployment does not use it: the endpoint is open. Put the key "
                  "in a Modal Secret and name it in EMBER_API_KEY_SECRET.", stacklevel=1)

image = (
    modal.Image.debian_slim(python_version="3.11")
    # ember's runtime dependencies, read from pyproject.toml when the image is built (locally, at deploy). The
    # torch wheel pip picks on Linux is the CUDA build.
    .pip_install_from_pyproject(str(PYPROJECT))
    .env({"HF_HOME": HF_CACHE_DIR, "EMBER_CACHE_DIR": EMBER_CACHE_DIR})
    # The default keeps .py files only: the model configs and chat templates would be missing.
    .add_local_python_source("ember", ignore=lambda path: not keep_source_file(path))
)
hf_volume = modal.Volume.from_name(HF_VOLUME, create_if_missing=True)
cache_volume = modal.Volume.from_name(CACHE_VOLUME, create_if_missing=True)
secrets = [modal.Secret.from_name(name, required_keys=[key])
           for name, key in ((SETTINGS.api_key_secret, "EMBER_API_KEY"), (SETTINGS.hf_secret, "HF_TOKEN")) if name]

# Imported as ember.deploy.modal_app (`modal deploy -m`), this file is already in the image with the rest of the
# package; Modal adds the file itself only when it is deployed by path and imported as a top-level module.
app = modal.App(SETTINGS.app_name, include_source=__package__ != "ember.deploy")

_server: subprocess.Popen[bytes] | None = None


@app.function(image=image, volumes={HF_CACHE_DIR: hf_volume, EMBER_CACHE_DIR: cache_volume}, secrets=secrets,
              env=SETTINGS.to_env(), **function_options(SETTINGS))
@modal.concurrent(max_inputs=SETTINGS.max_inputs)
@modal.web_server(port=PORT, startup_timeout=SETTINGS.startup_timeout_s)
def serve() -> None:
    """Runs once per container: weights into the cache volume, then `ember serve`, ready before Modal routes."""
    global _server
    started = time.monotonic()
    download_weights(SETTINGS)
    hf_volume.commit()  # the next container finds the weights even if this one is stopped before it commits
    _server = subprocess.Popen(serve_command(SETTINGS), env=server_env(os.environ))
    wait_until_ready(f"http://127.0.0.1:{PORT}/health", _server,
                     SETTINGS.startup_timeout_s - (time.monotonic() - started), os.environ.get("EMBER_API_KEY"))
