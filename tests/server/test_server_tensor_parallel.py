"""`ember serve --tensor-parallel-size 3` (the embedded SmolLM2 over three CPU processes) answers through the
openai SDK exactly as the one-process server does, and a SIGTERM stops it and its workers cleanly.

SmolLM2-135M has 9 heads and 3 KV heads, so 3 ranks; its weights come from the fused copy ember keeps of the
GGUF (written by the session's one-process server), whose q/k/v and gate/up are cut per rank from one tensor."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import openai

from ember.config import EMBEDDED_MODEL


def test_three_ranks_serve_what_one_serves(client: openai.OpenAI, free_port: int) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    one = client.chat.completions.create(model=EMBEDDED_MODEL, messages=messages, max_tokens=16, temperature=0)
    # A prompt of 40 token ids, greedy and without EOS: 16 tokens to compare one for one.
    ids = list(range(100, 140))
    one_ids = client.completions.create(model=EMBEDDED_MODEL, prompt=ids, max_tokens=16, temperature=0,
                                        logprobs=0, extra_body={"ignore_eos": True})
    port = free_port
    proc = subprocess.Popen([sys.executable, "-m", "ember", "serve", "--port", str(port), "--device", "cpu",
                             "--tensor-parallel-size", "3", "--max-model-len", "512", "--kv-cache-memory-bytes",
                             "16MiB"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        tp = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0, timeout=120)
        three = tp.chat.completions.create(model=EMBEDDED_MODEL, messages=messages, max_tokens=16, temperature=0)
        assert three.choices[0].message.content == one.choices[0].message.content
        three_ids = tp.completions.create(model=EMBEDDED_MODEL, prompt=ids, max_tokens=16, temperature=0,
                                          logprobs=0, extra_body={"ignore_eos": True})
        assert three_ids.choices[0].logprobs.tokens == one_ids.choices[0].logprobs.tokens
        assert len(one_ids.choices[0].logprobs.tokens) == 16
        stream = tp.completions.create(model=EMBEDDED_MODEL, prompt="The capital of France is", max_tokens=8,
                                       temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert "tensor parallelism over 3 processes" in out
