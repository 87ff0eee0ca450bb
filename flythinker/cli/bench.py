"""`flythinker bench`: run the benchmark scripts, then build benchmarks/results/REPORT.md from their JSON.

Each script in the benchmarks folder runs in its own process (`python -m benchmarks.<name>` for the repo's own
folder, with `--quick` when the script supports it) and writes `<results>/<stem>.json` (+ usually its own PNG);
the report builder is `benchmarks/report.py`. Both live in a source checkout, not in the installed package:
without one, `flythinker bench` says so in one line.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flythinker.cli.common import CLIError, positive_int

HELP = "run the benchmark suites and write benchmarks/results/REPORT.md"
DESCRIPTION = ("Run the benchmark scripts in benchmarks/ (each in its own process), collect their JSON results and "
               "write REPORT.md with tables and PNG plots. Every figure is a ratio to a baseline measured in the "
               "same run. Needs a flythinker source checkout (benchmarks/ is not installed with the package).")
NOT_SUITES = {"__init__", "conftest", "common", "report"}  # files in benchmarks/ that are not benchmark scripts


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="quick mode of each suite that has one (minutes on 2 CPU cores instead of much longer)")
    p.add_argument("--only", action="append", metavar="NAME", default=None,
                   help="run only this suite (file stem in benchmarks/, e.g. bench_loss); repeatable")
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    p.add_argument("--report-only", action="store_true",
                   help="do not run anything: rebuild REPORT.md from the JSON results already there")
    p.add_argument("--bench-dir", default=None, help="benchmark scripts folder (default: <repo>/benchmarks)")
    p.add_argument("--results-dir", default=None, help="results folder (default: <bench-dir>/results)")
    p.add_argument("--timeout", type=positive_int, default=3600, help="seconds allowed per suite (default: "
                   "%(default)s)")


def repo_root() -> Path:
    """The source checkout flythinker is imported from (the folder holding flythinker/ and benchmarks/)."""
    return Path(__file__).resolve().parents[2]


def _report_module():
    """`benchmarks/report.py` of the source checkout, imported by path (benchmarks/ is not an installed package)."""
    path = repo_root() / "benchmarks" / "report.py"
    if not path.is_file():
        raise CLIError(f"the benchmark report builder {path} is not there: `flythinker bench` runs from a flythinker "
                       "source checkout (benchmarks/ is not installed with the package)")
    spec = importlib.util.spec_from_file_location("flythinker_benchmarks_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def discover(bench_dir: Path) -> list[Path]:
    return sorted(p for p in bench_dir.glob("*.py") if p.stem not in NOT_SUITES and not p.stem.startswith("_"))


def run_suite(script: Path, quick: bool, timeout: int, root: Path) -> dict[str, Any]:
    """Run one benchmark script in its own process; returns {name, cmd, rc, seconds, tail}."""
    cmd = [sys.executable, str(script)]
    if script.parent.resolve() == (root / "benchmarks").resolve():
        cmd = [sys.executable, "-m", f"benchmarks.{script.stem}"]
    if quick and "--quick" in script.read_text():
        cmd.append("--quick")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = 124, f"timed out after {timeout} s\n{(exc.stdout or b'')[-1000:]!r}"
    return {"name": script.stem, "cmd": " ".join(cmd[1:]), "rc": rc, "seconds": time.perf_counter() - start,
            "tail": tail}


def _suites(args: argparse.Namespace, bench_dir: Path) -> list[Path]:
    suites = discover(bench_dir)
    if args.only:
        unknown = sorted(set(args.only) - {s.stem for s in suites})
        if unknown:
            raise CLIError(f"unknown suite(s) {unknown}; available: {[s.stem for s in suites]}")
        suites = [s for s in suites if s.stem in args.only]
    return suites


def run(args: argparse.Namespace) -> int:
    """Run `flythinker bench`; returns the exit status (1 when a suite failed)."""
    from tqdm.auto import tqdm

    root = repo_root()
    bench_dir = Path(args.bench_dir).expanduser() if args.bench_dir else root / "benchmarks"
    if not bench_dir.is_dir():
        raise CLIError(f"benchmark folder not found: {bench_dir} (`flythinker bench` runs from a flythinker source "
                       "checkout; or pass --bench-dir)")
    report = _report_module()
    suites = _suites(args, bench_dir)
    if args.list:
        print("\n".join(s.stem for s in suites))
        return 0
    results = Path(args.results_dir).expanduser() if args.results_dir else bench_dir / "results"
    if results.exists() and not results.is_dir():
        raise CLIError(f"--results-dir {results} is an existing file, not a folder")
    results.mkdir(parents=True, exist_ok=True)
    runs = []
    if not args.report_only:
        bar = tqdm(suites, desc="benchmarks", unit="suite", file=sys.stdout)
        for script in bar:
            bar.set_postfix_str(script.stem)
            r = run_suite(script, args.quick, args.timeout, root)
            runs.append(r)
            status = "ok" if r["rc"] == 0 else f"FAILED (exit {r['rc']})"
            bar.write(f"{script.stem}: {status} in {r['seconds']:.0f} s")
    print(f"wrote {report.write_report(results, runs)}")
    return 0 if all(r["rc"] == 0 for r in runs) else 1
