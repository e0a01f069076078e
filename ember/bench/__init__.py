"""Benchmarks: `ember bench latency | throughput | serve | hf`. Each prints its roofline beside its numbers."""
