"""`flythinker bench`: run the benchmark suites, then build REPORT.md from their JSON.

Two kinds of suite live in a checkout's benchmarks/ folder, each run in its own process:

- scripts `benchmarks/<name>.py` (those with a `__main__` block): `python -m benchmarks.<name> [args]`, each writing
  `<results>/<name>.json` (+ usually a PNG);
- pytest-benchmark suites `benchmarks/suites/test_<name>.py` (the kernel microbenchmarks): `python -m pytest FILE
  --benchmark-only --benchmark-json <results>/pytest_<name>.json`; the report folds that JSON in.

Quick mode is a contract each suite declares at module level, read with `ast` (never by running the module):

    QUICK = {"args": ["--reps", "1", "--out", "{results}/decode"], "seconds": 40}   # its quick arguments, its time
    QUICK = {"skip": "a 40-minute training run"}                                   # no quick mode, and why

`{results}` is replaced by the results folder; a script's quick arguments must name it, so a quick run writes only
there. `seconds` is the suite's quick time on 2 idle CPU cores: the quick set's total is their sum (the runner
allows each suite 10x its figure, at least 5 minutes, since a shared machine runs slower; each run's CPU seconds
are recorded beside its wall time, a load-independent measure of its work). `FULL_REQUIRES = "cuda"` (or "vllm")
makes a full run skip the suite, with the reason in the report, where that is missing. Quick runs write to
`<bench-dir>/results-quick/` (git-ignored by a `.gitignore` inside it) unless `--results-dir` says otherwise: never
over the committed results.
The report builder is `benchmarks/report.py`. Both live in a source checkout, not in the installed package: without
one, `flythinker bench` says so in one line.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flythinker.cli.common import CLIError, positive_int

HELP = "run the benchmark suites and write REPORT.md (tables and plots) in the results folder"
DESCRIPTION = ("Run the benchmark suites in benchmarks/ (scripts and pytest-benchmark suites, each in its own "
               "process), collect their JSON results and write REPORT.md with tables and PNG plots. Every figure "
               "is a ratio to a baseline measured in the same run. --quick runs each suite's declared quick mode into "
               "benchmarks/results-quick/ (the committed benchmarks/results/ is left alone). Needs a flythinker "
               "source checkout (benchmarks/ is not installed with the package).")
NOT_SUITES = {"__init__", "conftest", "report"}  # files in benchmarks/ that are never suites
PYTEST_DIR = "suites"  # benchmarks/<this>/test_*.py: pytest-benchmark suites
QUICK_DIR = "results-quick"
# a quick suite is stopped after 10x its declared time (at least 5 minutes): declared times are for an idle machine,
# and a 2-core machine shared with other jobs runs several times slower (the report records the load)
QUICK_TIMEOUT_FACTOR, QUICK_MIN_TIMEOUT = 10, 300
REQUIREMENTS = ("cuda", "vllm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="each suite's declared quick mode (the set's time is the sum of the declared times; "
                        "`--list --quick` prints them); results go to <bench-dir>/results-quick unless --results-dir")
    p.add_argument("--only", action="append", metavar="NAME", default=None,
                   help="run only this suite (as `--list` names it, e.g. bench_loss or pytest_sampling); repeatable")
    p.add_argument("--list", action="store_true", help="list the suites (with --quick: their quick modes) and exit")
    p.add_argument("--report-only", action="store_true",
                   help="do not run anything: rebuild REPORT.md from the JSON results already there")
    p.add_argument("--bench-dir", default=None, help="benchmark scripts folder (default: <repo>/benchmarks)")
    p.add_argument("--results-dir", default=None,
                   help="results folder (default: <bench-dir>/results, or <bench-dir>/results-quick with --quick)")
    p.add_argument("--timeout", type=positive_int, default=None,
                   help="seconds allowed per suite (default: 3600; with --quick, 3x the suite's declared time)")


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


# ---- suites and their declarations ---------------------------------------------------------------------------------
@dataclass
class Suite:
    """One benchmark suite: a script (`kind="script"`) or a pytest-benchmark file (`kind="pytest"`)."""

    name: str
    path: Path
    kind: str
    quick: dict[str, Any] = field(default_factory=dict)  # {"args", "seconds"} or {"skip"}
    full_requires: str | None = None

    @property
    def quick_seconds(self) -> float:
        return float(self.quick.get("seconds", 0))


def _module_constants(path: Path) -> tuple[dict[str, Any], bool]:
    """Literal module-level assignments of `path` (name -> value) and whether it has an `if __name__ ==
    "__main__":` block; parsed, never run."""
    tree = ast.parse(path.read_text(), filename=str(path))
    consts: dict[str, Any] = {}
    has_main = False
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                consts[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
        elif isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            has_main = True
    return consts, has_main


def check_quick(name: str, kind: str, quick: Any) -> dict[str, Any]:
    """Validate a suite's `QUICK` declaration; returns it, or raises CLIError naming what is wrong."""
    where = f"suite {name}: QUICK"
    if not isinstance(quick, dict):
        raise CLIError(f"{where} is not declared as a literal dict (see `flythinker bench --help`: "
                       "QUICK = {'args': [...], 'seconds': N} or {'skip': 'why'})")
    if set(quick) == {"skip"} and isinstance(quick["skip"], str) and quick["skip"].strip():
        return quick
    if set(quick) != {"args", "seconds"}:
        raise CLIError(f"{where} must have exactly the keys args and seconds, or skip; got {sorted(quick)}")
    args, seconds = quick["args"], quick["seconds"]
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise CLIError(f"{where}['args'] must be a list of strings")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= 3600:
        raise CLIError(f"{where}['seconds'] must be a number of seconds in (0, 3600], got {seconds!r}")
    if kind == "script" and not any("{results}" in a for a in args):
        raise CLIError(f"{where}['args'] must send the output under {{results}} (e.g. '--out', "
                       f"'{{results}}/{name}'), so a quick run never writes over the committed results")
    return quick


def _suite(path: Path, kind: str, name: str) -> Suite:
    consts, _ = _module_constants(path)
    if "QUICK" not in consts:
        raise CLIError(f"suite {name} ({path}) declares no quick mode: add a module-level QUICK = {{'args': [...], "
                       "'seconds': N} or {'skip': 'why'} (see `flythinker bench --help`)")
    requires = consts.get("FULL_REQUIRES")
    if requires is not None and requires not in REQUIREMENTS:
        raise CLIError(f"suite {name}: FULL_REQUIRES must be one of {REQUIREMENTS}, got {requires!r}")
    return Suite(name, path, kind, check_quick(name, kind, consts["QUICK"]), requires)


def discover(bench_dir: Path) -> list[Suite]:
    """Every suite in `bench_dir`, each with its validated declarations (CLIError on a missing or bad one)."""
    suites = []
    for p in sorted(bench_dir.glob("*.py")):
        if p.stem in NOT_SUITES or p.stem.startswith("_") or not _module_constants(p)[1]:
            continue  # helpers and modules without a __main__ block are not suites
        suites.append(_suite(p, "script", p.stem))
    for p in sorted((bench_dir / PYTEST_DIR).glob("test_*.py")):
        suites.append(_suite(p, "pytest", "pytest_" + p.stem.removeprefix("test_")))
    return suites


def _missing(requirement: str | None) -> str | None:
    """Why a full run cannot run here (None when it can)."""
    if requirement == "cuda":
        import torch

        return None if torch.cuda.is_available() else "needs a CUDA device (none here)"
    if requirement == "vllm" and importlib.util.find_spec("vllm") is None:
        return "needs vLLM in this Python environment (see its docstring for the command)"
    return None


# ---- running -------------------------------------------------------------------------------------------------------
def suite_command(suite: Suite, quick: bool, results: Path, root: Path) -> list[str]:
    """The command line that runs `suite` (quick or full) with its output in `results`."""
    args = [a.replace("{results}", str(results)) for a in suite.quick["args"]] if quick else []
    if suite.kind == "pytest":
        return [sys.executable, "-m", "pytest", str(suite.path), "--benchmark-only", "-q", "-p", "no:cacheprovider",
                f"--benchmark-json={results / f'.{suite.name}.json.tmp'}", *args]
    if suite.path.parent.resolve() == (root / "benchmarks").resolve():
        return [sys.executable, "-m", f"benchmarks.{suite.path.stem}", *args]
    return [sys.executable, str(suite.path), *args]


def run_suite(suite: Suite, quick: bool, timeout: int, root: Path, results: Path) -> dict[str, Any]:
    """Run one suite in its own process; returns {name, cmd, rc, seconds, tail} (+ budget_s in quick mode)."""
    cmd = suite_command(suite, quick, results, root)
    # a suite is its own pytest session: when this runs inside a pytest-xdist worker, the worker's variables would
    # make pytest-benchmark think it is a worker too and disable itself
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST_", "PYTEST_CURRENT_TEST"))}
    env["PYTHONPATH"] = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    start, cpu0 = time.perf_counter(), _children_cpu_s()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = 124, f"timed out after {timeout} s\n{(exc.stdout or b'')[-1000:]!r}"
    if suite.kind == "pytest":  # pytest-benchmark writes its JSON in place: move it in whole, only on success
        tmp = results / f".{suite.name}.json.tmp"
        if rc == 0 and tmp.is_file():
            os.replace(tmp, results / f"{suite.name}.json")
        tmp.unlink(missing_ok=True)
    out = {"name": suite.name, "cmd": " ".join(cmd[1:]).replace(str(root) + os.sep, ""), "rc": rc,
           "seconds": time.perf_counter() - start, "cpu_s": _children_cpu_s() - cpu0, "load": os.getloadavg()[0],
           "tail": tail}
    if quick:
        out["budget_s"] = suite.quick_seconds
    return out


def _children_cpu_s() -> float:
    """User + system CPU seconds of the finished child processes so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _skipped(suite: Suite, why: str) -> dict[str, Any]:
    return {"name": suite.name, "cmd": "", "rc": 0, "seconds": 0.0, "tail": "", "skipped": why}


def _selected(args: argparse.Namespace, bench_dir: Path) -> list[Suite]:
    suites = discover(bench_dir)
    if args.only:
        unknown = sorted(set(args.only) - {s.name for s in suites})
        if unknown:
            raise CLIError(f"unknown suite(s) {unknown}; available: {[s.name for s in suites]}")
        suites = [s for s in suites if s.name in args.only]
    return suites


def results_folder(args: argparse.Namespace, bench_dir: Path) -> Path:
    """Where results go: --results-dir, else <bench-dir>/results (full) or <bench-dir>/results-quick (quick, made
    git-ignored by a `.gitignore` inside it)."""
    if args.results_dir:
        results = Path(args.results_dir).expanduser()
        if results.exists() and not results.is_dir():
            raise CLIError(f"--results-dir {results} is an existing file, not a folder")
    else:
        results = bench_dir / (QUICK_DIR if args.quick else "results")
    if args.quick and not args.results_dir and not args.report_only and not args.list:
        results.mkdir(parents=True, exist_ok=True)
        ignore = results / ".gitignore"
        if not ignore.is_file():
            ignore.write_text("# quick-mode results of `flythinker bench --quick`: never committed\n*\n")
    return results


def _print_list(suites: list[Suite], quick: bool) -> None:
    if not quick:
        print("\n".join(s.name for s in suites))
        return
    for s in suites:
        print(f"{s.name:32s} " + (f"skipped in quick mode: {s.quick['skip']}" if "skip" in s.quick else
                                  f"{s.quick_seconds:5.0f} s  {' '.join(s.quick['args'])}"))
    print(f"quick set: {sum(s.quick_seconds for s in suites):.0f} s declared (2 idle CPU cores)")


def _run_all(args: argparse.Namespace, suites: list[Suite], root: Path, results: Path) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    runs = []
    bar = tqdm(suites, desc="benchmarks", unit="suite", file=sys.stdout)
    for suite in bar:
        bar.set_postfix_str(suite.name)
        why = suite.quick.get("skip") if args.quick else _missing(suite.full_requires)
        if why:
            runs.append(_skipped(suite, why))
            bar.write(f"{suite.name}: skipped ({why})")
            continue
        timeout = args.timeout or (max(QUICK_MIN_TIMEOUT, int(QUICK_TIMEOUT_FACTOR * suite.quick_seconds))
                                   if args.quick else 3600)
        r = run_suite(suite, args.quick, timeout, root, results)
        runs.append(r)
        status = "ok" if r["rc"] == 0 else f"FAILED (exit {r['rc']})"
        bar.write(f"{suite.name}: {status} in {r['seconds']:.0f} s ({r['cpu_s']:.0f} CPU s, load {r['load']:.1f})")
    return runs


def run(args: argparse.Namespace) -> int:
    """Run `flythinker bench`; returns the exit status (1 when a suite failed)."""
    root = repo_root()
    bench_dir = Path(args.bench_dir).expanduser() if args.bench_dir else root / "benchmarks"
    if not bench_dir.is_dir():
        raise CLIError(f"benchmark folder not found: {bench_dir} (`flythinker bench` runs from a flythinker source "
                       "checkout; or pass --bench-dir)")
    report = _report_module()
    results = results_folder(args, bench_dir)
    if args.report_only and not args.list:
        if not results.is_dir():
            raise CLIError(f"results folder not found: {results} (run `flythinker bench` first, or pass "
                           "--results-dir)")
        print(f"wrote {report.write_report(results, [])}")
        return 0
    suites = _selected(args, bench_dir)
    if args.list:
        _print_list(suites, args.quick)
        return 0
    results.mkdir(parents=True, exist_ok=True)
    if any(s.kind == "pytest" for s in suites) and importlib.util.find_spec("pytest_benchmark") is None:
        raise CLIError("the kernel suites need pytest-benchmark: pip install 'flythinker[dev]'")
    start = time.perf_counter()
    runs = _run_all(args, suites, root, results)
    declared = f"; declared {sum(s.quick_seconds for s in suites):.0f} s idle" if args.quick else ""
    print(f"{'quick' if args.quick else 'full'} set: {time.perf_counter() - start:.0f} s wall, "
          f"{sum(r.get('cpu_s', 0.0) for r in runs):.0f} CPU s, load now {os.getloadavg()[0]:.1f}{declared}")
    print(f"wrote {report.write_report(results, runs)}")
    return 0 if all(r["rc"] == 0 for r in runs) else 1


__all__ = ["Suite", "add_arguments", "check_quick", "discover", "results_folder", "run", "suite_command"]
