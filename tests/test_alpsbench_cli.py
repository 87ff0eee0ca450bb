"""`flythinker alpsbench` on the attributed packet sample: scores, resume, user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flythinker.alpsbench import iter_packets, score_record
from flythinker.cli import main

DATA = Path(__file__).parent / "data" / "alpsbench"


def _run(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_released_task1_scores_match_the_library(tmp_path, capsys):
    rc, out, err = _run(capsys, "alpsbench", "--data", DATA, "--task", "task1", "--predictor",
                        "released:gemini-3-flash-preview", "--out", tmp_path / "r")
    assert rc == 0, err
    summary = json.loads(out)
    direct = [score_record(p.task1_gold, p.task1_outputs["gemini-3-flash-preview"]).algo for p in iter_packets(DATA)]
    assert summary["metrics"]["score"]["mean"] == pytest.approx(sum(direct) / len(direct))
    assert summary["n"] == 3 and summary["parse"]["failed"] == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text()) == summary


def test_task3_bm25_resumes(tmp_path, capsys):
    out_dir = tmp_path / "t3"
    rc, out, _ = _run(capsys, "alpsbench", "--data", DATA, "--task", "task3", "--predictor", "bm25", "--out", out_dir,
                      "--limit", "2")
    assert rc == 0 and json.loads(out)["predicted"] == 2
    with (out_dir / "predictions.jsonl").open("a") as fh:
        fh.write('{"benchmark_id": "half-writ')  # a run killed mid-line
    rc, out, _ = _run(capsys, "alpsbench", "--data", DATA, "--task", "task3", "--predictor", "bm25", "--out", out_dir)
    s = json.loads(out)
    assert rc == 0 and s["resumed"] == 2 and s["predicted"] == 1 and s["n"] == 3
    assert len((out_dir / "predictions.jsonl").read_text().splitlines()) == 3
    assert 0.0 <= s["metrics"]["accuracy"]["mean"] <= s["metrics"]["harness"]["mean"] <= 1.0


@pytest.mark.parametrize("argv, needle", [
    (["--task", "task3", "--predictor", "released:gpt-5.2"], "task1 only"),
    (["--task", "task1", "--predictor", "bm25"], "task3 only"),
    (["--task", "task1", "--predictor", "released:nobody"], "no released Task 1 output named 'nobody'"),
    (["--task", "task4", "--predictor", "bm25"], "needs --ability"),
    (["--task", "task3", "--predictor", "bm25", "--distractors", "500"], "bank is too small"),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, needle):
    rc, _, err = _run(capsys, "alpsbench", "--data", DATA, "--out", tmp_path / "x", *argv)
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and "%|" not in ln]
    assert rc == 2 and len(lines) == 1 and needle in lines[0], err
