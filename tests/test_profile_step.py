"""benchmarks/profile_step.py: its summary of a trace (busy time as the union of overlapping
intervals, per-step figures, the ranking) and a tiny run on the CPU."""

import re
import sys

import pytest

from conftest import BENCHMARKS, load_benchmark


@pytest.fixture
def profile_step(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports bench.py beside it, as when run as a script
    return load_benchmark("profile_step")


def test_summary_counts_overlaps_once_and_ranks_by_time(profile_step):
    Interval = profile_step.Interval
    intervals = [Interval("a", 0, 10), Interval("b", 5, 12), Interval("a", 20, 30), Interval("c", 21, 22),
                 Interval("b", 40, 41)]
    summary = profile_step.summarise(intervals, steps=2, wall_us=100.0, top=2)
    assert summary.busy_us == (12 + 10 + 1) / 2  # [0, 12], [20, 30], [40, 41]
    assert summary.wall_us == 50.0 and summary.idle_share == pytest.approx(1 - 23 / 100)
    assert summary.launches == 2.5
    assert summary.top == [("a", 10.0, 1.0), ("b", 4.0, 1.0)]


@pytest.mark.parametrize("section", ["train", "decode"])
def test_tiny_cpu_run_prints_the_tables(profile_step, section, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["profile_step.py", "--tiny", "--device", "cpu", "--model", "goom:chunked",
                                      "--section", section, "--batch", "2", "--seq-len", "16", "--prompt-len", "8",
                                      "--steps", "2", "--operators", "3", "--host-operators", "2"])
    profile_step.main()
    out = capsys.readouterr().out
    assert f"goom:chunked, {section}" in out.replace("training step", "train").replace("decoding step", "decode")
    assert "| top-level operator | us per step | calls per step |" in out
    operators, host = out.split("| operator | input shapes | own us per step | calls per step |\n|---|---|---|---|\n")[1].split("\nHost: ")
    # which operators come first depends on the CPU's timing (aten::mm, AdamW's step, a cast, ...):
    # three rows, each an operator, its input shapes, its time and its calls
    rows = operators.strip().splitlines()
    assert len(rows) == 3 and all(re.fullmatch(r"\| .+ \| \[.*\] \| [\d,]+\.\d \| \d+ \|", row) for row in rows), rows
    host_operators = host.split("| operator | input shapes | own host us per step | calls per step |\n|---|---|---|---|\n")[1]
    assert "of the wall time outside them" in host and len(host_operators.strip().splitlines()) == 2


def test_a_misspelt_model_spec_is_refused_before_profiling(profile_step, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["profile_step.py", "--tiny", "--device", "cpu", "--model", "goom:chunked:graphs"])
    with pytest.raises(SystemExit):
        profile_step.main()
    assert "unknown option(s) graphs" in capsys.readouterr().err
