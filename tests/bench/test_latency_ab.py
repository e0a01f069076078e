"""`bench/latency_ab.py`: variant parsing, the alternating order, the summary, and one real run on the CPU."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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


class FakeBench:
    """Stands in for `subprocess.run` of the bench: records each run's environment and timeout, takes `seconds`
    of a fake clock, and writes a result (TPOT from the variant's EMBER_X), fails, or times out."""

    def __init__(self, seconds: float, fail: str | None = None, hang: str | None = None) -> None:
        self.now, self.seconds, self.fail, self.hang = 0.0, seconds, fail, hang
        self.calls: list[tuple[dict[str, str], float | None]] = []

    def clock(self) -> float:
        return self.now

    def run(self, cmd: list[str], env: dict[str, str], timeout: float | None, **_: Any) -> SimpleNamespace:
        self.calls.append((env, timeout))
        self.now += self.seconds
        x = env.get("EMBER_X", "")
        if x == self.hang:
            raise subprocess.TimeoutExpired(cmd, timeout or 0)
        if x == self.fail:
            return SimpleNamespace(returncode=1, stdout="", stderr="boom")
        out = Path(cmd[cmd.index("--output-json") + 1])
        out.write_text(json.dumps({"tpot_ms": 4.0 + len(x), "pct_of_roofline": 90.0, "bandwidth_gb_s": 4000.0}))
        return SimpleNamespace(returncode=0, stdout="", stderr="")


def _main(monkeypatch: pytest.MonkeyPatch, fake: FakeBench, *argv: str) -> int:
    monkeypatch.setattr(latency_ab.subprocess, "run", fake.run)
    monkeypatch.setattr(latency_ab.time, "monotonic", fake.clock)
    monkeypatch.setattr(sys, "argv", ["latency_ab.py", *argv, "--", "m"])
    return latency_ab.main()


def test_base_runs_without_any_compared_variable_even_when_the_shell_sets_one(monkeypatch: pytest.MonkeyPatch,
                                                                                tmp_path: Path) -> None:
    monkeypatch.setenv("EMBER_X", "from-the-shell")
    monkeypatch.setenv("EMBER_Y", "also")
    monkeypatch.setenv("UNRELATED", "kept")
    fake = FakeBench(seconds=10)
    out = tmp_path / "ab.json"
    assert _main(monkeypatch, fake, "--variant", "a=EMBER_X=1", "--variant", "b=EMBER_X=22,EMBER_Y=2",
                 "--json", str(out)) == 0
    envs = [env for env, _ in fake.calls]
    assert [(e.get("EMBER_X"), e.get("EMBER_Y"), e["UNRELATED"]) for e in envs] == [
        (None, None, "kept"), ("1", None, "kept"), ("22", "2", "kept"),
        ("22", "2", "kept"), ("1", None, "kept"), (None, None, "kept")]
    summary = {s["variant"]: s for s in json.loads(out.read_text())["summary"]}
    assert summary["a"]["median_tpot_ms"] == 5.0 and summary["b"]["change_from_base_pct"] == pytest.approx(50.0)


def test_the_deadline_skips_runs_that_would_pass_it_and_stops_one_that_does(monkeypatch: pytest.MonkeyPatch,
                                                                            tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    fake = FakeBench(seconds=30, hang="1")
    out = tmp_path / "ab.json"
    # base, the first run, runs whole; a starts with 40 s left, its timeout, and hangs; round two would pass 70 s.
    assert _main(monkeypatch, fake, "--variant", "a=EMBER_X=1", "--deadline", "70", "--json", str(out)) == 1
    assert [t for _, t in fake.calls] == [None, 40]
    runs = json.loads(out.read_text())["runs"]
    assert [r["variant"] for r in runs] == ["base", "a"] and "deadline" in runs[1]["error"]
    assert capsys.readouterr().out.count("skipped") == 2  # the two runs of round two


def test_a_failed_run_is_reported_and_the_rest_still_run(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    fake = FakeBench(seconds=1, fail="1")
    assert _main(monkeypatch, fake, "--variant", "a=EMBER_X=1", "--variant", "c=EMBER_X=333", "--rounds", "1") == 1
    printed = capsys.readouterr().out
    assert "a          failed:\nboom" in printed and "c          median 7.000 ms  +75.00 %" in printed


@pytest.mark.parametrize("variants", [["base=EMBER_X=1"], ["a=EMBER_X=1", "a=EMBER_X=2"]])
def test_base_and_repeated_names_are_refused(monkeypatch: pytest.MonkeyPatch, variants: list[str]) -> None:
    with pytest.raises(SystemExit):
        _main(monkeypatch, FakeBench(seconds=1), *[a for v in variants for a in ("--variant", v)])
