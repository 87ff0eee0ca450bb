"""benchmarks/gpu_check.py --dry-run: the GPU check runs end to end on CPU (tiny shapes, Triton interpreter), so
the script a lent GPU runs in its few minutes cannot rot. No timing is asserted (the dry run's mean nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("gpu_check") / "dry.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_section_runs(dry_run):
    assert dry_run["dry_run"] is True and "no meaning" in dry_run["timings"]
    assert {k: s["status"] for k, s in dry_run["sections"].items()} == dict.fromkeys(
        ("env", "kernels", "bandwidth", "sampling", "decode"), "ok")


def test_every_triton_kernel_matches_its_twin_in_fp32_and_bf16(dry_run):
    kernels = dry_run["sections"]["kernels"]
    assert kernels["all_ok"] is True
    for name in ("latent_fuse", "linear_cross_entropy", "sample"):
        assert {r["dtype"] for r in kernels[name]} == {"float32", "bfloat16"}, name
    fp32 = [r for r in kernels["linear_cross_entropy"] if r["dtype"] == "float32"]
    assert all(r["loss"] < 1e-5 and r["d_weight"] < 1e-5 for r in fp32)
    assert all(r["same_token_fraction"] == 1.0 for r in kernels["sample"] if r["setting"] == "greedy")


def test_bandwidth_sampling_and_decode_report_their_ratios(dry_run):
    s = dry_run["sections"]
    assert s["bandwidth"]["latent_fuse"]["fwd"]["gbps"] > 0
    assert s["bandwidth"]["linear_cross_entropy"]["fwdbwd"]["hf_over_triton"] > 0
    assert all(r["hf_over_triton"] > 0 for r in s["sampling"]["rows"])
    variants = s["decode"]["sdpa"]["variants"]
    assert set(variants) == {"generator alone", "generator alone, static cache", "pair, two copies, parallel=off",
                             "pair, two copies, parallel=threads", "pair, shared base (batched step)"}
    assert variants["generator alone"]["over_generator_alone"] == 1.0
    assert "shared-base" in variants["pair, shared base (batched step)"]["path"]


def test_bad_arguments_are_refused():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--sections", "nope"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown section" in proc.stderr
