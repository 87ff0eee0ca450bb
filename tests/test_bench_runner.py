"""`flythinker bench`: the quick-mode contract every suite declares, the separate quick results folder, the
pytest-benchmark suites folded into the report. Nothing slow runs here: the real suites' declarations are read
(never run), and the end-to-end runs use a throwaway benchmarks folder with toy suites."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest

from flythinker.cli import bench, main

REPO = Path(__file__).resolve().parents[1]
QUICK_SET_LIMIT_S = 600  # the whole quick set on 2 idle CPU cores


def run(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_real_suite_declares_its_quick_mode(tmp_path):
    suites = bench.discover(REPO / "benchmarks")  # raises CLIError on a suite without a valid declaration
    names = {s.name for s in suites}
    assert {"pytest_latent_fuse", "pytest_linear_cross_entropy", "pytest_sampling", "gpu_check",
            "bench_loss"} <= names
    assert not {"report", "opcount", "conftest"} & names  # helpers are not suites
    quick_dir = tmp_path / "quick"
    for s in suites:
        if "skip" in s.quick:
            continue
        cmd = bench.suite_command(s, True, quick_dir, REPO)
        outputs = [a for a in cmd if str(quick_dir) in a]
        assert outputs, f"{s.name}: its quick run names no output under the quick results folder: {cmd}"
        assert not any("{results}" in a or "benchmarks/results" in a for a in cmd), cmd
    total = sum(s.quick_seconds for s in suites)
    assert 0 < total <= QUICK_SET_LIMIT_S, total


def test_quick_results_default_to_their_own_folder(tmp_path):
    ns = argparse.Namespace(results_dir=None, quick=True, report_only=False, list=False)
    folder = bench.results_folder(ns, tmp_path)
    assert folder == tmp_path / "results-quick"
    assert "*" in (folder / ".gitignore").read_text().split()  # git never sees quick results
    ns.quick = False
    assert bench.results_folder(ns, tmp_path) == tmp_path / "results"
    ns.quick, ns.results_dir = True, str(tmp_path / "mine")  # told otherwise: used as given
    assert bench.results_folder(ns, tmp_path) == tmp_path / "mine"


@pytest.mark.parametrize("quick, error", [
    ("[1, 2]", "literal dict"),
    ("{'args': ['--quick'], 'seconds': 5}", "{results}"),  # a script's quick run must write under {results}
    ("{'args': [], 'seconds': 0}", "seconds"),
    ("{'skip': ''}", "exactly the keys"),
    (None, "declares no quick mode"),
])
def test_bad_declarations_are_one_line_errors(capsys, tmp_path, quick, error):
    (tmp_path / "toy.py").write_text(("" if quick is None else f"QUICK = {quick}\n") +
                                     "if __name__ == '__main__':\n    pass\n")
    rc, out, err = run(capsys, "bench", "--quick", "--list", "--bench-dir", tmp_path)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "toy" in err and error in err, err


TOY_SCRIPT = '''"""A toy suite: writes its JSON to --out (default: the committed results folder next to it)."""
import argparse, json, pathlib
QUICK = {"args": ["--quick", "--out", "{results}/toy.json"], "seconds": 5}
if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "toy.json"))
    a = ap.parse_args()
    pathlib.Path(a.out).write_text(json.dumps({"quick": a.quick, "cases": [{"n": 1, "mem_ratio": 0.25}]}))
'''
TOY_PYTEST = '''"""A toy pytest-benchmark suite."""
QUICK = {"args": ["--benchmark-min-rounds=2"], "seconds": 5}

def test_fused(benchmark):
    benchmark.group = "toy"
    benchmark.extra_info["impl"] = "fused"
    benchmark(sum, range(10))

def test_twin(benchmark):
    benchmark.group = "toy"
    benchmark.extra_info["impl"] = "twin"
    benchmark(sum, range(1000))
'''


def test_quick_run_leaves_the_committed_results_alone(capsys, tmp_path):
    pytest.importorskip("pytest_benchmark")
    benchdir = tmp_path / "benchmarks"
    (benchdir / "suites").mkdir(parents=True)
    (benchdir / "toy.py").write_text(TOY_SCRIPT)
    (benchdir / "slow.py").write_text('QUICK = {"skip": "hours"}\n'
                                      'if __name__ == "__main__":\n    raise SystemExit(1)\n')
    (benchdir / "suites" / "test_toy.py").write_text(TOY_PYTEST)
    committed = benchdir / "results"
    committed.mkdir()
    (committed / "toy.json").write_text('{"published": true}')
    before = tree_digest(committed)

    rc, out, err = run(capsys, "bench", "--quick", "--bench-dir", benchdir)
    assert rc == 0, out + err
    assert tree_digest(committed) == before  # not one byte of the committed results changed
    quick = benchdir / "results-quick"
    assert json.loads((quick / "toy.json").read_text())["quick"] is True
    data = json.loads((quick / "pytest_toy.json").read_text())
    assert {b["extra_info"]["impl"] for b in data["benchmarks"]} == {"fused", "twin"}
    report = (quick / "REPORT.md").read_text()
    assert "## pytest_toy" in report and "twin_over_fused" in report  # the pytest-benchmark JSON folded in
    assert "mem_ratio" in report and "hours" in report  # the script's figures; the skipped suite and why
    assert "quick set:" in out and "CPU s" in out and "declared 10 s idle" in out
    assert not list(quick.glob(".*.tmp"))


def test_report_folds_pytest_benchmark_groups():
    from benchmarks.report import pytest_benchmark_summary

    def b(impl, median, group="g", nbytes=None):
        return {"name": f"test[{impl}]", "group": group, "param": impl, "stats": {"median": median, "rounds": 3},
                "extra_info": {"impl": impl, "loadavg": [1.5, 1, 1], **({"bytes": nbytes} if nbytes else {})}}

    data = {"machine_info": {"node": "box"}, "benchmarks": [b("fused", 0.002, nbytes=4e6), b("twin", 0.006),
                                                            b("clone", 0.001)]}
    row = pytest_benchmark_summary(data)["groups"][0]
    assert row["twin_over_fused"] == pytest.approx(3.0) and row["clone_over_fused"] == pytest.approx(0.5)
    assert row["fused_gbps"] == pytest.approx(2.0) and row["rounds_min"] == 3 and row["loadavg_max"] == 1.5
