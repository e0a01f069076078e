"""Talk to a running `ember serve` with the official openai SDK.

    .venv/bin/ember serve &                      # in another terminal
    .venv/bin/python examples/client.py          # or: examples/client.py http://host:8000 --api-key KEY
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", nargs="?", default=os.environ.get("EMBER_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("EMBER_API_KEY", "EMPTY"))
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    client = OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.api_key)
    model = client.models.list().data[0].id  # the first served name is the canonical one
    print(f"model: {model}")

    # Chat, whole answer at once.
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "You are a concise assistant."},
                  {"role": "user", "content": "What is the capital of France?"}],
        max_tokens=args.max_tokens,
        temperature=0,
    )
    print(f"chat: {reply.choices[0].message.content!r} ({reply.usage.completion_tokens} tokens)")

    # Chat, streamed token by token, with the token count in a last chunk.
    print("stream: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write a haiku about the sea."}],
        max_tokens=args.max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        seed=7,
    )
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        elif chunk.usage is not None:
            print(f"\n({chunk.usage.completion_tokens} tokens)")

    # Plain completion with vLLM's extra sampling parameters passed through extra_body.
    completion = client.completions.create(
        model=model,
        prompt="The three primary colors are",
        max_tokens=16,
        temperature=0.8,
        seed=1,
        logprobs=2,
        extra_body={"top_k": 40, "repetition_penalty": 1.1},
    )
    choice = completion.choices[0]
    print(f"completion: {choice.text!r}")
    if choice.logprobs is not None and choice.logprobs.tokens:
        print(f"first token {choice.logprobs.tokens[0]!r}: logprob {choice.logprobs.token_logprobs[0]:.3f}")


if __name__ == "__main__":
    main()
