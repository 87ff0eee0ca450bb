"""The memory benchmarks (benchmarks/bench_loss.py, benchmarks/bench_train_step.py) end to end on toy sizes: each
case runs in its own worker process, the JSON report is written, fused and naive compute the same loss, and the
shared measurement (`benchmarks._common.measured_step`) sees a step's allocation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path, *args: str) -> dict:
    module = "benchmarks." + script.removesuffix(".py")  # as the docs run them: a module, from the checkout
    subprocess.run([sys.executable, "-m", module, "--out", str(out), *args], check=True,
                   cwd=ROOT, capture_output=True, text=True, timeout=300)
    return json.loads(out.with_suffix(".json").read_text())


def test_measured_step_counts_what_the_step_allocates():
    """In a fresh process, as the benchmarks measure (in this long-lived test process, memory freed by earlier tests
    may still be resident and serve the allocation with no RSS growth: seen here, 0.0 MiB)."""
    code = ("import json, torch\n"
            "from benchmarks._common import measured_step\n"
            "out, m = measured_step(lambda: torch.ones(64 << 20, dtype=torch.uint8).add_(1), torch.device('cpu'))\n"
            "print(json.dumps({'n': out.numel(), **m}))")
    res = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["n"] == 64 << 20 and m["wall_s"] > 0 and m["cpu_s"] >= 0
    assert 60 <= m["peak_growth_mb"] < 200  # one 64 MiB tensor allocated and touched (add_ is in place)


def test_bench_loss_runs_and_reports(tmp_path):
    report = _run("bench_loss.py", tmp_path / "loss", "--N", "256", "--H", "64", "--V", "1024", "--reps", "2")
    (case,) = report["cases"]
    assert case["naive"]["loss"] == pytest.approx(case["fused"]["loss"], rel=1e-5)
    assert len(case["fused"]["times_s"]) == 2 and case["mem_ratio"] > 0
    assert (tmp_path / "loss.png").is_file()


def test_bench_train_step_runs_and_reports(tmp_path):
    report = _run("bench_train_step.py", tmp_path / "step", "--layers", "1", "--T", "128", "--B", "1", "--V", "512",
                  "--no-plain")
    (case,) = report["cases"]
    assert case["gradient_checkpointing"] and case["naive"]["loss"] > 1
    assert case["naive"]["loss"] == pytest.approx(case["fused"]["loss"], rel=1e-5)
    assert case["naive"]["activation_mb"] > 0 and case["fused"]["logits_returned"] is False
