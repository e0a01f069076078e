"""The Llama family (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2) over a flat token batch and a paged KV cache."""

from __future__ import annotations

import torch
from torch import nn

from ember.attention import AttentionBackend, AttentionMetadata
from ember.distributed.parallel import TensorParallel
from ember.model.config import ModelArchConfig
from ember.model.layers import GatedMLP, RMSNorm, RotaryEmbedding
from ember.model.linear import Linear


class LlamaAttention(nn.Module):
    """With tensor parallelism this rank's heads only: o_proj's partial sums are added up over the ranks."""

    def __init__(self, cfg: ModelArchConfig, rotary: RotaryEmbedding, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.num_heads = tp.shard(cfg.num_attention_heads, "num_attention_heads")[1]
        self.num_kv_heads = tp.shard(cfg.num_key_value_heads, "num_key_value_heads")[1]
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        # q, k and v share one matmul: one read of the activations, one launch.
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False, after_attention=True)
        self.rotary = rotary

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata, attn: AttentionBackend, *, rms_eps: float | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """`rms_eps` (folded norms, `LlamaForCausalLM.fold_norms`): x is normalised inside qkv_proj; `residual`:
        added inside o_proj (one rank only: the sum over ranks would add it once per rank)."""
        assert residual is None or not self.tp.enabled
        o = None
        gemv = self.qkv_proj.gemv_kernels(x) if isinstance(self.qkv_proj, Linear) else None
        if gemv is not None and gemv.FUSE_ROTARY_KV:
            o = attn.forward_from_hidden(x, self.qkv_proj.weight, self.qkv_proj.bias, self.num_heads,
                                         self.num_kv_heads, kv_cache[0], kv_cache[1], meta, self.scale,
                                         rotary=self.rotary, positions=positions, rms_eps=rms_eps)
        if o is None:
            qkv = self.qkv_proj(x, rms_eps=rms_eps)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(-1, self.num_heads, self.head_dim)
            k = k.view(-1, self.num_kv_heads, self.head_dim)
            v = v.view(-1, self.num_kv_heads, self.head_dim)
            # The backend applies rotary: the Triton one fuses it into its KV-cache store.
            o = attn.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, rotary=self.rotary,
                             positions=positions)
        o = o.reshape(-1, self.q_size)
        return self.tp.all_reduce(self.o_proj(o, residual=residual))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig, rotary: RotaryEmbedding, tp: TensorParallel) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary, tp)
        self.mlp = GatedMLP(cfg.hidden_size, tp.shard(cfg.intermediate_size, "intermediate_size")[1], tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual, kv_cache, meta, attn):
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, kv_cache, meta, attn)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual

    def forward_residual_in_products(self, positions, x, kv_cache, meta, attn) -> torch.Tensor:
        """The layer with each residual added inside the product before the next norm (o_proj, down_proj: in
        place, `Linear.forward`): x is the whole hidden state (residual included) and so is the result. The norms
        then read their rows once and write them once, where a fused add + RMSNorm makes four passes over
        [tokens, hidden]; many-token steps on one GPU save two of them a norm."""
        h = self.self_attn(positions, self.input_layernorm(x), kv_cache, meta, attn, residual=x)
        return self.mlp(self.post_attention_layernorm(h), residual=h)

    def forward_folded(self, positions, x, kv_cache, meta, attn) -> torch.Tensor:
        """The layer with its norms' weights folded into qkv_proj and gate_up_proj (`LlamaForCausalLM.fold_norms`):
        x is the whole hidden state (residual included) and so is the result. Each norm and residual add happens
        inside a product, which at batch 1 saves the two RMSNorm launches of the layer."""
        h = self.self_attn(positions, x, kv_cache, meta, attn, rms_eps=self.input_layernorm.eps, residual=x)
        return self.mlp(h, rms_eps=self.post_attention_layernorm.eps, residual=h)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelArchConfig, max_positions: int, tp: TensorParallel) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # One rotary table shared by all layers (registered once, so it is not in state_dict per layer).
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.rotary = rotary
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, rotary, tp) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norms_folded = False  # see LlamaForCausalLM.fold_norms
        # Steps of at least `residual_in_products_min_tokens` tokens through
        # `LlamaDecoderLayer.forward_residual_in_products` (16-bit weights on one GPU: set by the loader).
        self.residual_in_products = False
        self.residual_in_products_min_tokens = 2

    def forward(self, input_ids, positions, kv_caches, meta, attn) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.norms_folded and x.shape[0] == 1:
            for layer, kv in zip(self.layers, kv_caches, strict=True):
                x = layer.forward_folded(positions, x, kv, meta, attn)
            return self.norm(x)
        if self.residual_in_products and x.shape[0] >= self.residual_in_products_min_tokens:
            for layer, kv in zip(self.layers, kv_caches, strict=True):
                x = layer.forward_residual_in_products(positions, x, kv, meta, attn)
            return self.norm(x)
        residual = None
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(positions, x, residual, kv, meta, attn)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelArchConfig, max_positions: int, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.tp = tp or TensorParallel()
        self.model = LlamaModel(cfg, max_positions, self.tp)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                attn: AttentionBackend) -> torch.Tensor:
        """Hidden states of every input token: [num_tokens, hidden]."""
        return self.model(input_ids, positions, kv_caches, meta, attn)

    def fold_norms(self) -> None:
        """Fold each layer's RMSNorm weights into the product that follows it (W·diag(g)) and make the norms
        weightless, so that a one-token forward can normalise inside the products (`forward_folded`).

        Every path computes the same function afterwards, up to one rounding of W·g (FP16/BF16 weights). For
        16-bit weights on one GPU only: FP8 weights would need re-quantizing, and with tensor parallelism the
        residual cannot be added before the sum over ranks.
        """
        assert not self.tp.enabled
        with torch.no_grad():
            for layer in self.model.layers:
                for norm, proj in ((layer.input_layernorm, layer.self_attn.qkv_proj),
                                   (layer.post_attention_layernorm, layer.mlp.gate_up_proj)):
                    assert isinstance(proj, Linear) and proj.weight.is_floating_point()
                    proj.weight.mul_(norm.weight.to(proj.weight.dtype))
                    norm.weight.fill_(1.0)
        self.model.norms_folded = True

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
