"""The Triton kernels in CI, which has no GPU: a subset of tests/gpu through Triton's CPU interpreter, so their
index arithmetic (block tables, split-KV and its merge counters, GQA packing, the rotary KV store) is checked
against the torch twins on every run, not only when a GPU session runs tests/gpu. A child process, because
`TRITON_INTERPRET` must be set before the kernels are defined; the interpreter is slow, hence a subset (the
rest, and bf16 and FP8, which the interpreter gets wrong, run compiled in tests/gpu on a GPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ATTENTION = ("paged_attention_matches_reference or decode_paths or split_kv_merge_and_counter_reset "
             "or paged_attention_with_scattered_tiles "
             "or store_kv_matches_reference or backend_forward_matches_torch_backend or split_kv_persistent")
# The interpreter runs a launch's programs one after another: 300 tokens took 28 s, 37 take 4.
ROTARY = [f"tests/gpu/test_fused_kernels.py::test_rotary_store_kv_matches_torch[{case}]"
          for case in ("9-3-64-37-dtype0", "32-8-128-1-dtype0", "4-4-64-37-dtype0")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, tests/gpu runs these kernels compiled")
@pytest.mark.parametrize("selection", [["tests/gpu/test_attention_kernels.py", "-k", ATTENTION], ROTARY,
                                       ["tests/gpu/test_gemv.py", "tests/gpu/test_gate_up_silu.py"]],
                         ids=["attention", "rotary-kv-store", "gemv"])
def test_triton_kernels_under_the_interpreter(selection: list[str]) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # Without the property-testing plugins these kernels' tests never use: 5 s less of start-up a child.
    plugins_off = ["-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:schemathesis"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", *plugins_off, *selection], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= 3, r.stdout[-2000:]  # not all skipped
