"""`bench/latency_ab.py`: variant parsing, the alternating order, the summary, and one real run on the CPU."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("latency_ab",
                                               Path(__file__).resolve().parents[2] / "bench" / "latency_ab.py")
assert _spec is not None and _spec.loader is not None
latency_ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(latency_ab)


def test_variants_parse_with_commas_inside_a_value() -> None:
    assert latency_ab.parse_variant("s=EMBER_ATTN_SPLIT_KV=256,1,8") == ("s", {"EMBER_ATTN_SPLIT_KV": "256,1,8"})
    assert latency_ab.parse_variant("two=A=1,B=x,y") == ("two", {"A": "1", "B": "x,y"})
    for bad in ("noenv", "n=", "n=,A=1", "=A=1"):
        with pytest.raises(argparse.ArgumentTypeError):
            latency_ab.parse_variant(bad)


def test_every_round_runs_each_variant_once_in_alternating_order() -> None:
    assert latency_ab.schedule(["base", "a", "b"], 3) == ["base", "a", "b", "b", "a", "base", "base", "a", "b"]


def test_summary_medians_and_change_from_base() -> None:
    runs = [{"variant": "base", "tpot_ms": 4.0}, {"variant": "a", "tpot_ms": 3.9}, {"variant": "a", "tpot_ms": 3.7},
            {"variant": "base", "tpot_ms": 4.2}, {"variant": "b", "error": "boom"}]
    base, a, b = latency_ab.summarize(runs, ["base", "a", "b"])
    assert base["median_tpot_ms"] == pytest.approx(4.1) and base["change_from_base_pct"] == pytest.approx(0.0)
    assert a["median_tpot_ms"] == pytest.approx(3.8) and a["change_from_base_pct"] == pytest.approx(-100 * 0.3 / 4.1)
    assert b == {"variant": "b", "tpot_ms": [], "median_tpot_ms": None, "change_from_base_pct": None}


def test_a_run_on_the_cpu_records_the_bench_and_the_deadline_skips_the_rest(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ab.json"
    monkeypatch.setattr(sys, "argv", ["latency_ab.py", "--rounds", "1", "--deadline", "0", "--json", str(out),
                                      "--variant", "x=EMBER_GRAPH_COPIES_MAX_BATCH=8", "--", "tiny-llama",
                                      "--load-format", "dummy", "--device", "cpu", "--input-len", "4",
                                      "--output-len", "3", "--iters", "1", "--max-model-len", "64"])
    assert latency_ab.main() == 0
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["variant"] == "base" and run["env"] == {} and run["bench"] == "latency" and run["tpot_ms"] > 0
    assert [s["variant"] for s in result["summary"]] == ["base", "x"] and result["summary"][1]["tpot_ms"] == []
    assert "skipped x (run 2): the deadline" in capsys.readouterr().out
