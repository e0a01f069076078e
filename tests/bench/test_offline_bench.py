"""`ember bench throughput` end to end on the CPU: every token generated, the floors consistent."""

from __future__ import annotations

import gc
import json

import pytest

from ember.cli import main


@pytest.mark.parametrize("sustained", [0.05, 0.0])
def test_throughput_reports_burst_and_sustained_rooflines(tmp_path, capsys, sustained):
    out = tmp_path / "res.json"
    freeze = ["--freeze-heap"] if sustained else []  # with and without: only the flag freezes
    frozen_before = gc.get_freeze_count()
    try:
        assert main(["bench", "throughput", "tiny-llama", "--load-format", "dummy", "--max-model-len", "64",
                     "--num-prompts", "3", "--input-len", "16", "--output-len", "4", "--output-json", str(out),
                     "--sustained-seconds", str(sustained), *freeze]) == 0
        assert (gc.get_freeze_count() > frozen_before) == bool(freeze)
    finally:
        if freeze:  # nothing else in these tests freezes
            gc.unfreeze()
    res = json.loads(out.read_text())
    assert res["heap_frozen"] == bool(freeze)
    assert res["num_prompts"] == 3 and res["output_tok_s"] * res["elapsed_s"] == pytest.approx(12)
    assert res["pct_of_roofline"] == pytest.approx(100 * res["roofline_s"] / res["elapsed_s"])
    if not sustained:
        assert "pct_of_sustained_roofline" not in res
        return
    # The same FLOPs over another rate: the two floors scale inversely with the rates.
    assert res["roofline_sustained_s"] * res["sustained_matmul_tflop_s"] == pytest.approx(
        res["roofline_s"] * res["matmul_tflop_s"], rel=1e-6)
    assert res["pct_of_sustained_roofline"] == pytest.approx(100 * res["roofline_sustained_s"] / res["elapsed_s"])
    assert "pct_of_sustained_roofline" in capsys.readouterr().out
