"""What the benchmark scripts share: where results go, the one-subprocess-per-case worker protocol, the memory
probes the workers read, the JSON output, the naive-vs-fused bar plot, and starting a loopback HTTP server
(`free_port`, `wait_for_health`, `stop_process`).

A script that measures memory runs each case in a fresh process (`run_worker`: `python -m benchmarks.<name>
--worker <cfg JSON>` from the repo root, the last stdout line is the result JSON), so that one case's allocations
never inflate another's peak. Scripts run as modules from the checkout (`python -m benchmarks.<name>`, what
`flythinker bench` does), where Python puts the repo root first on sys.path; none edits sys.path.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


# ---- the worker protocol ---------------------------------------------------------------------------------------
def worker_parser(description: str, *, default_out: Path) -> argparse.ArgumentParser:
    """argparse with the options every subprocess-per-case script has: --worker (internal), --threads, --device,
    --out (results path without suffix: .json and .png are written)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in CPU workers (default: %(default)s)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--out", default=str(default_out), help="results path without suffix (default: %(default)s)")
    return ap


def serve_worker(args: argparse.Namespace, worker: Callable[[dict], dict]) -> bool:
    """If this process is a worker (`--worker CFG`), run `worker(cfg)`, print its JSON and return True."""
    if not args.worker:
        return False
    print(json.dumps(worker(json.loads(args.worker))))
    return True


def run_worker(script: str | os.PathLike, cfg: dict, *, env: dict | None = None) -> dict:
    """Run one case of `script` (a file in benchmarks/) in a fresh process, as `python -m benchmarks.<stem>` from
    the repo root; returns the JSON dict its worker printed last."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{Path(script).stem}", "--worker", json.dumps(cfg)],
                         capture_output=True, text=True, check=False, env=env, cwd=root)
    if out.returncode != 0:
        raise RuntimeError(f"case {cfg} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- memory probes (Linux /proc) ---------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Reset the peak RSS (VmHWM, Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_bytes(reset_ok: bool) -> int:
    """Peak RSS since :func:`reset_peak` (when it worked), else the lifetime peak (an upper bound)."""
    if reset_ok:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device) -> None:
    """Wait for `device`'s queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def measured_step(step: Callable[[], object], device) -> tuple[object, dict]:
    """Run `step()` once on `device` (a torch.device) and measure it: `(its result, {"peak_growth_mb": memory
    growth over the step, "wall_s", "cpu_s"})`. Memory: CPU, peak RSS growth (VmHWM reset first, so it counts
    everything the step allocates and touches); CUDA, `max_memory_allocated` growth."""
    import time

    import torch

    sync(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base, reset_ok = rss_bytes(), reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    out = step()
    sync(device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_bytes(reset_ok)
    return out, {"peak_growth_mb": (peak - base) / 2**20, "wall_s": wall, "cpu_s": cpu}


# ---- output ------------------------------------------------------------------------------------------------------
def write_json(path: Path, report: dict, *, indent: int = 2) -> Path:
    """Write a result JSON atomically (a killed run never leaves a truncated file for the report), holding its
    output lock (flythinker.run_folder.output_file: two runs of one suite publish one after the other)."""
    import json

    from flythinker.run_folder import output_file

    with output_file(path, overwrite=True) as out:
        return out.write_bytes(json.dumps(report, indent=indent).encode())


def plot_naive_vs_fused(cases: list[dict], names: list[str], panels: list[tuple[str, str, str]],
                        labels: tuple[str, str], title: str, path: Path) -> None:
    """Grouped bars naive vs fused per case, one panel per (value key, y label, ratio key); the ratio is printed
    over the fused bar. Shared by bench_loss and bench_train_step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = range(len(cases))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, unit, rkey) in zip(axes, panels, strict=True):
        ax.bar([x - 0.2 for x in xs], [c["naive"][key] for c in cases], 0.4, label=labels[0])
        ax.bar([x + 0.2 for x in xs], [c["fused"][key] for c in cases], 0.4, label=labels[1])
        for x, c in zip(xs, cases, strict=True):
            ax.text(x + 0.2, c["fused"][key], f"{c[rkey]:.2f}x", ha="center", va="bottom")
        ax.set_xticks(list(xs), names)
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Terminate ``proc``, and kill it if it has not exited after ``grace_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def wait_for_health(proc: subprocess.Popen, port: int, log: Path, timeout_s: float, what: str = "server",
                    poll_s: float = 0.5) -> None:
    """Return once ``GET http://127.0.0.1:PORT/health`` answers 200. If ``proc`` exits first or ``timeout_s``
    passes, stop it and raise a RuntimeError carrying the tail of its ``log``."""
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the {what} exited ({proc.returncode}): {log.read_text()[-3000:]}")
        if time.time() > deadline:
            stop_process(proc)
            raise RuntimeError(f"the {what} did not answer /health in {timeout_s:.0f} s: {log.read_text()[-3000:]}")
        time.sleep(poll_s)
