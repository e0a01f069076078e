"""Offline inference: `LLM(model=...).generate(prompts, SamplingParams)` and `.chat(messages)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import fields
from typing import Any

from ember.config import EngineConfig
from ember.engine.llm_engine import LLMEngine
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        names = {f.name for f in fields(EngineConfig)}
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"unknown engine options: {', '.join(sorted(unknown))}")
        self._attach(LLMEngine(EngineConfig(model=model, **kwargs)))

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        llm = cls.__new__(cls)
        llm._attach(engine)
        return llm

    def _attach(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the tensor-parallel worker processes now rather than when the object is collected."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompts: str | list[str] | list[list[int]] | None = None,
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 prompt_token_ids: list[list[int]] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion, batched together; results in the order of the prompts."""
        items: list[tuple[str | None, list[int] | None]]
        if prompt_token_ids is not None:
            items = [(None, ids) for ids in prompt_token_ids]
        elif isinstance(prompts, str):
            items = [(prompts, None)]
        else:
            items = [(p, None) if isinstance(p, str) else (None, list(p)) for p in prompts or []]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = ([sampling_params] * len(items) if isinstance(sampling_params, SamplingParams)
                  else list(sampling_params))
        if len(params) != len(items):
            raise ValueError("give one SamplingParams, or one per prompt")
        order = []
        for (text, ids), p in zip(items, params, strict=True):
            rid = f"offline-{next(self._ids)}"
            # Each request owns its params (max_tokens may be filled in from the context length).
            self.engine.add_request(rid, text, ids, p.clone())
            order.append(rid)
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[rid] for rid in order]

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None, chat_template: str | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(list(c), add_generation_prompt, chat_template=chat_template)
                   for c in conversations]  # type: ignore[arg-type]
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(ids, sampling_params)
