"""Smoke test of the benchmark: a tiny run of every contender finishes quickly and prints the
tables (the real figures come from `scripts/bench`, see docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from bridge_migrate_testlab.bench import interleave

pytestmark = pytest.mark.root

SMOKE_LIMIT_S = 60.0  # measured 25-41 s, the upper end with other suites on both cores


def test_interleave_spreads_each_contender_over_the_rounds() -> None:
    order = interleave({"a": 4, "b": 2})
    assert sorted(order) == [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 0), ("b", 1)]
    assert [k for k, _ in order].index("b") < 3  # b is not left for the end


def test_a_tiny_bench_prints_the_table_in_time(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "bridge_migrate_testlab.bench", "--runs", "1", "--no-scale"]
    argv += ["--rollback-runs", "1", "--cold-runs", "1", "--tail-ms", "300"]
    argv += ["--docs", str(tmp_path)]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=SMOKE_LIMIT_S + 20)
    took = time.monotonic() - started
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: the agent missed the bar
    out = done.stdout
    assert "| bridge-migrate apply (one batch) | 1 |" in out, out
    assert "| classic recipe (ip commands) | 1 |" in out
    assert "| same operations, one netlink call each | 1 |" in out
    assert "### The bar (agent)" in out
    doc = (tmp_path / "benchmarks.md").read_text()
    assert "kernel" in doc and out.split("\n", 1)[0] in doc
    assert took < SMOKE_LIMIT_S, f"the smoke bench took {took:.1f} s"
