"""Tensor parallelism: each of N processes holds a slice of every layer and they add up their partial results."""
