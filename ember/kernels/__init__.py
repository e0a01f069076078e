"""Triton kernels (GPU only). Each has a torch twin used on CPU and as the oracle in tests.

Modules here import triton at import time, so import them lazily from code that must also run without it.
"""
