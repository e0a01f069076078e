"""`ember deploy ray`: the CLI flags -> Ray Serve options, and one real replica on a local Ray, driven through the
openai SDK the way a user drives it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from ember.cli import build_parser, engine_config_from_args
from ember.config import EMBEDDED_MODEL
from ember.deploy import ray_serve

ray = pytest.importorskip("ray")
# Ray Serve 2.60 declares its config with pydantic v1-style Field extras; not ember's to fix.
pytestmark = pytest.mark.filterwarnings(r"ignore::DeprecationWarning:ray\..*")

DEPLOY_ARGS = ["deploy", "ray", "--served-model-name", EMBEDDED_MODEL, "llm", "--max-model-len", "1024",
               "--kv-cache-memory-bytes", "256MiB", "--num-replicas", "1", "--max-ongoing-requests", "8",
               "--engine-process"]  # the path a replica on a GPU takes by default


def _args(*argv: str) -> Any:
    return build_parser().parse_args(["deploy", "ray", *argv])


# --------------------------------------------------------------------------- flags -> options (no Ray needed)


def test_fixed_replicas_by_default() -> None:
    opts = ray_serve.deployment_options(_args("--max-num-seqs", "32"))
    assert opts["num_replicas"] == 1 and "autoscaling_config" not in opts
    # The per-replica cap defaults to what one engine batches.
    assert opts["max_ongoing_requests"] == 32
    assert opts["max_queued_requests"] == -1
    # No GPU for the replica: Ray would leave the card visible, so the replica is told there is none.
    assert opts["ray_actor_options"] == {"num_gpus": 0.0, "num_cpus": 1.0,
                                         "runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}}


def test_fixed_replicas_and_resources() -> None:
    opts = ray_serve.deployment_options(
        _args("--num-replicas", "3", "--max-ongoing-requests", "64", "--max-queued-requests", "100",
              "--num-cpus-per-replica", "4"), cluster_gpus=8)
    assert (opts["num_replicas"], opts["max_ongoing_requests"], opts["max_queued_requests"]) == (3, 64, 100)
    # GPUs in the cluster: one per replica unless told otherwise.
    assert opts["ray_actor_options"] == {"num_gpus": 1.0, "num_cpus": 4.0}
    explicit = ray_serve.deployment_options(_args("--num-gpus-per-replica", "0.5", "--kv-cache-memory-bytes",
                                                  "8GiB"), cluster_gpus=8)
    assert explicit["ray_actor_options"]["num_gpus"] == 0.5
    # A tensor-parallel replica reserves a GPU per rank.
    assert ray_serve.deployment_options(_args("-tp", "4"), cluster_gpus=8)["ray_actor_options"]["num_gpus"] == 4.0
    with pytest.raises(ValueError, match="needs a GPU per rank"):
        ray_serve.deployment_options(_args("-tp", "4", "--num-gpus-per-replica", "2"), cluster_gpus=8)
    # --device cpu on a GPU cluster reserves no GPU.
    assert ray_serve.deployment_options(_args("--device", "cpu"), cluster_gpus=8)["ray_actor_options"][
        "num_gpus"] == 0.0


def test_autoscaling_flags() -> None:
    opts = ray_serve.deployment_options(_args("--min-replicas", "0", "--max-replicas", "4",
                                              "--max-ongoing-requests", "16"))
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 8.0}
    assert opts["max_ongoing_requests"] == 16
    # Any one autoscaling flag switches the autoscaler on; the rest take their defaults.
    only_target = ray_serve.deployment_options(_args("--target-ongoing-requests", "5"))
    assert only_target["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 1,
                                                 "target_ongoing_requests": 5.0}
    assert ray_serve.deployment_options(_args("--min-replicas", "2"))["autoscaling_config"]["max_replicas"] == 2


@pytest.mark.parametrize("argv", [["--num-replicas", "2", "--min-replicas", "0"],
                                  ["--min-replicas", "3", "--max-replicas", "2"],
                                  # a shared card: each replica would size its KV cache from what is left
                                  ["--num-gpus-per-replica", "0.5"]])
def test_conflicting_flags_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    args = _args(*argv)
    with pytest.raises(SystemExit) as exc:  # refused before Ray starts
        args.handler(args)
    assert exc.value.code == 2
    assert "replicas" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--max-queued-requests", "0"], ["--min-replicas", "-1"],
                                  ["--target-ongoing-requests", "0"]])
def test_out_of_range_flags_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):  # Ray would refuse them too, but only after starting
        _args(*argv)


def test_server_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBER_API_KEY", raising=False)
    cfg = ray_serve.server_config_from_args(_args("--api-key", "k1", "--served-model-name", "a", "b"))
    assert (cfg.api_keys, cfg.served_model_names) == (["k1"], ["a", "b"])
    assert ray_serve.server_config_from_args(_args()).served_model_names == [EMBEDDED_MODEL]
    assert ray_serve.server_config_from_args(_args()).engine_process is None  # as `ember serve` decides
    assert ray_serve.server_config_from_args(_args("--engine-process")).engine_process is True
    monkeypatch.setenv("EMBER_API_KEY", "from-env")
    assert ray_serve.server_config_from_args(_args()).api_keys == ["from-env"]


# --------------------------------------------------------------------------- a real deployment


@pytest.fixture(scope="module")
def ray_url() -> Iterator[str]:
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        args = build_parser().parse_args([*DEPLOY_ARGS, "--port", "0"])  # 0: deploy picks a free one
        # The CLI's own path, minus the wait for Ctrl-C: returns once the replica has loaded the model.
        yield ray_serve.deploy(args, engine_config_from_args(args))
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_client(ray_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=ray_url + "/v1", api_key="EMPTY", max_retries=0, timeout=120)


def test_chat_and_stream(ray_client: openai.OpenAI) -> None:
    reply = ray_client.chat.completions.create(model="llm", max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "Say hello."}])
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens <= 8

    chunks = list(ray_client.completions.create(model=EMBEDDED_MODEL, prompt="Once upon a time", max_tokens=8,
                                                stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text and len({c.id for c in chunks}) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_health_and_models(ray_url: str, ray_client: openai.OpenAI) -> None:
    assert ray_url.startswith("http://127.0.0.1:") and not ray_url.endswith(":0")
    assert httpx.get(f"{ray_url}/health", timeout=30).status_code == 200
    assert [m.id for m in ray_client.models.list().data] == [EMBEDDED_MODEL, "llm"]


def test_unknown_field_is_400(ray_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        ray_client.chat.completions.create(model="llm", max_tokens=4, extra_body={"bogus_field": 1},
                                           messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 400
    assert isinstance(exc.value.body, dict) and exc.value.body["type"] == "invalid_request_error"
    assert "bogus_field" in exc.value.message
