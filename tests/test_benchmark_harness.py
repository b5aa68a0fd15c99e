"""benchmarks.harness: the timing rules every benchmark shares, on fake steps."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import harness


def _fake(durations, calls):
    """A step that reports the next of ``durations`` and records its name's order."""
    values = iter(durations)

    def step():
        calls.append(step)
        return next(values)

    return step


def test_rounds_interleave_and_ratios_are_medians_of_per_round_ratios():
    calls = []
    # Round means: base 1, 2, 4 (a drifting machine); method 2, 4, 12.
    base = _fake([1, 1, 2, 2, 4, 4], calls)
    method = _fake([2, 2, 4, 4, 12, 12], calls)
    rounds = harness.interleave({"base": base, "method": method}, rounds=3, steps_per_round=2)
    assert calls == [base, base, method, method] * 3  # every round runs both, in turn
    assert rounds.round_means == {"base": [1, 2, 4], "method": [2, 4, 12]}
    ratio = harness.ratio_to(rounds, "method", "base")
    assert ratio["round_ratios"] == [2, 2, 3]
    assert ratio["ratio"] == 2  # the median, not the drifting means' ratio 18/7
    assert ratio["round_ratio_iqr"] == [2, 2.5]
    assert rounds.summary("method")["median_step_s"] == 4
    assert len(rounds.loads) == 3


def test_slow_steps_get_fewer_steps_per_round_within_the_budget():
    steps = {"fast": lambda: 0.01, "slow": lambda: 4.0}
    assert harness.steps_within(steps, wanted=10, budget_s=2.0) == {"fast": 10, "slow": 1}


def test_timed_blocks_on_the_result():
    seen = []
    step = harness.timed(lambda: 7, seen.append)
    assert step() >= 0 and seen == [7]


def test_high_load_is_flagged_and_max_load_refuses(monkeypatch):
    monkeypatch.setattr(harness.os, "cpu_count", lambda: 2)
    load = harness.machine_load([3.5, 1.0, 1.0], [[1.0, 1.0, 1.0]])
    assert load["high_load"] and load["max_load_1min"] >= 3.5
    assert "Warning" in harness.load_note(load)
    monkeypatch.setattr(harness, "load_now", lambda: [0.5, 0.5, 0.5])
    quiet = harness.machine_load([0.5, 0.5, 0.5])
    assert not quiet["high_load"] and "Warning" not in harness.load_note(quiet)
    parser = argparse.ArgumentParser()
    monkeypatch.setattr(harness, "load_now", lambda: [5.0, 5.0, 5.0])
    with pytest.raises(SystemExit):
        harness.check_load(1.0, parser)
    harness.check_load(None, parser)  # no limit: runs (and is flagged later)


def test_results_are_written_and_the_partial_file_removed(tmp_path):
    harness.write_partial(tmp_path, "x", {"a": 1})
    assert (tmp_path / "x.partial.json").exists()
    harness.write_results(tmp_path, "x", {"a": 2.5}, "# x",
                          plot=lambda report, path: path.write_text("png"))
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 2.5}
    assert (tmp_path / "x.md").read_text() == "# x\n"
    assert (tmp_path / "x.png").read_text() == "png"
    assert not (tmp_path / "x.partial.json").exists()
