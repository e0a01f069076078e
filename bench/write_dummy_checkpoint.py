"""Write a shipped config's dummy weights to disk as a safetensors checkpoint (for cold-start measurements).

    python bench/write_dummy_checkpoint.py llama-3.1-8b-instruct /tmp/llama-8b-dummy [TOKENIZER_DIR]

A tokenizer directory given is copied in, so the checkpoint serves on its own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from ember.config import EngineConfig
from ember.engine.llm_engine import load_model
from ember.model.loader import resolve_model


def main(name: str, out: str, tokenizer: str | None = None, shard_bytes: int = 4 << 30) -> None:
    cfg = EngineConfig(model=name, load_format="dummy", tokenizer=tokenizer)
    loaded = load_model(cfg)
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(resolve_model(cfg).hf_config))
    shard: dict = {}
    size = n = 0
    for pname, p in loaded.model.named_parameters():
        shard[pname] = p.detach().cpu()
        size += p.numel() * p.element_size()
        if size >= shard_bytes:
            save_file(shard, str(d / f"model-{n:05d}.safetensors"))
            shard, size, n = {}, 0, n + 1
    if shard:
        save_file(shard, str(d / f"model-{n:05d}.safetensors"))
    if tokenizer:
        loaded.tokenizer.hf.save_pretrained(d)
    print(f"wrote {n + 1} shards to {d}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
