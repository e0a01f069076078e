"""Attention over the paged KV cache: one interface, a torch reference path and a Triton GPU path."""

from ember.attention.backend import AttentionBackend, AttentionMetadata, get_attention_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
