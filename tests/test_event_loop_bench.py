"""``benchmarks/event_loop.py`` on this checkout: it serves real requests through the HTTP app and counts the
event loop's CPU, and it refuses to measure another tree's modules than the one it is given. It checks that the
script works, not how fast anything is."""

import sys
from pathlib import Path

import pytest

from conftest import synthetic_profile

ROOT = Path(__file__).resolve().parents[1]


def test_the_event_loop_benchmark_answers_requests_and_counts_the_loops_cpu(tmp_path, monkeypatch):
    from benchmarks.event_loop import measure

    monkeypatch.setattr(sys, "path", list(sys.path))  # measure() puts the measured tree first

    out = measure(ROOT, callers=4, texts=2, seconds=1.0, sentences=["a short one", "and another sentence"],
                  profile_path=str(synthetic_profile(tmp_path)))
    assert out["requests"] > 0 and out["rps"] > 0
    assert 0 < out["loop_cpu_ms_per_request"] < 1000


def test_the_event_loop_benchmark_refuses_a_tree_whose_modules_it_did_not_load(tmp_path, monkeypatch):
    import deployments  # noqa: F401  (this checkout's, loaded before the benchmark names another tree)
    from benchmarks.event_loop import measure

    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(RuntimeError, match="measuring .*, not"):
        measure(tmp_path, callers=1, texts=1, seconds=0.1, sentences=["x"])
