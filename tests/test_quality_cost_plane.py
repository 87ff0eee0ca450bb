"""benchmarks/quality_cost_plane.py's pure parts: the frontier and the quality it reads (no model is loaded)."""

from __future__ import annotations

import json

from benchmarks.quality_cost_plane import frontier, quality


def test_frontier_keeps_only_the_points_nothing_beats_on_both_axes():
    points = {"a": (1.0, 0.50), "b": (3.0, 0.95), "c": (2.0, 0.90), "c_slow": (4.0, 0.90), "tie": (1.0, 0.50)}
    assert sorted(frontier(points)) == ["a", "b", "c", "tie"]  # c_slow: b is cheaper and better
    assert frontier({"x": (2.0, 0.6), "y": (1.0, 0.7)}) == ["y"]


def test_quality_reads_held_out_strategy_and_skips_variants_without_it(tmp_path):
    row = {"heldout_generation": {"strategy": {"mean": 0.8, "ci95": [0.7, 0.9]}}}
    path = tmp_path / "personalization_v2.json"
    pref = {"heldout_preference": {"strategy": {"mean": 0.6, "ci95": [0.5, 0.7]}}}
    path.write_text(json.dumps({"variants": {"a": {**row, **pref}, "b": {"heldout_generation": {}}, "c": pref}}))
    assert quality(path) == {"a": {"mean": 0.8, "ci95": [0.7, 0.9], "metric": "heldout_generation"},
                             "c": {"mean": 0.6, "ci95": [0.5, 0.7], "metric": "heldout_preference"}}
    assert quality(tmp_path / "missing.json") == {}
