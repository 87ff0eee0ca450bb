"""The benchmark report: every `benchmarks/results/*.json` rendered into `REPORT.md` (+ `ratios.png`).

`flythinker bench` runs the scripts and then calls :func:`write_report`; `python -m benchmarks.report [DIR]`
rebuilds the report from the JSON already in DIR (default: benchmarks/results). Every JSON is rendered
generically, so a new benchmark needs no change here:

- scalars of any dict (device, dtype, load average, targets, ...) -> a facts line: machine and baseline facts;
- lists of dicts (cases) and sibling flat dicts (variants) -> markdown tables, nested dicts flattened `a.b`;
- every number whose name contains `ratio`, `speedup` or `_over_` -> one bar chart across all benchmarks
  (`ratios.png`), because ratios to a baseline measured in the same run are the only numbers comparable across
  runs on a shared machine;
- a pytest-benchmark JSON (the kernel suites in benchmarks/suites/, `--benchmark-json`) is folded first
  (`pytest_benchmark_summary`): one row per benchmark group, the median of each implementation, and each one's
  time over the fused op's (`twin_over_fused`, `hf_over_fused`, `clone_over_fused` = the fused op's fraction of the
  clone bandwidth for the same bytes).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


# ---- pytest-benchmark JSON ------------------------------------------------------------------------------------------
def is_pytest_benchmark(data: Any) -> bool:
    """Whether a result JSON is pytest-benchmark's `--benchmark-json` output."""
    return isinstance(data, dict) and isinstance(data.get("benchmarks"), list) and "machine_info" in data


def _group_row(group: str, benches: list[dict]) -> dict[str, Any]:
    """One row of a benchmark group: each implementation's median (ms), its time over the fused op's, rounds, and
    the fused op's GB/s where the suite recorded the bytes it moves."""
    med = {(b.get("extra_info") or {}).get("impl") or b.get("param") or b["name"]: b["stats"]["median"]
           for b in benches}
    row: dict[str, Any] = {"group": group, **{f"{k}_ms": v * 1e3 for k, v in med.items()}}
    if "fused" in med and med["fused"] > 0:
        row.update({f"{k}_over_fused": v / med["fused"] for k, v in med.items() if k != "fused"})
        nbytes = next(((b.get("extra_info") or {}).get("bytes") for b in benches
                       if (b.get("extra_info") or {}).get("impl") == "fused"), None)
        if nbytes:
            row["fused_gbps"] = nbytes / med["fused"] / 1e9
    row["rounds_min"] = min(b["stats"]["rounds"] for b in benches)
    row["loadavg_max"] = max(((b.get("extra_info") or {}).get("loadavg") or [0.0])[0] for b in benches)
    return row


def pytest_benchmark_summary(data: dict) -> dict[str, Any]:
    """A pytest-benchmark JSON as run facts + one table row per group (see `_group_row`)."""
    groups: dict[str, list[dict]] = {}
    for b in data["benchmarks"]:
        groups.setdefault(b.get("group") or b["name"], []).append(b)
    mi, first = data.get("machine_info") or {}, (data["benchmarks"][0].get("extra_info") or {}
                                                 if data["benchmarks"] else {})
    facts = {"source": "pytest-benchmark", "datetime": data.get("datetime"), "machine": mi.get("node"),
             "cpu": (mi.get("cpu") or {}).get("brand_raw"), "python": mi.get("python_version"),
             "device": first.get("device"), "torch_threads": first.get("torch_threads"),
             "commit": (data.get("commit_info") or {}).get("id"), "benchmarks": len(data["benchmarks"]),
             "timing": "median seconds per call; *_over_fused = that implementation's time / the fused op's"}
    return {**{k: v for k, v in facts.items() if v is not None},
            "groups": [_group_row(g, bs) for g, bs in groups.items()]}


# ---- rendering -----------------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        return f"{v:.3g}" if (a and (a < 1e-2 or a >= 1e4)) else f"{v:.3f}".rstrip("0").rstrip(".") or "0"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v).replace("|", "/").replace("\n", " ")


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool)) or (
        isinstance(v, (list, tuple)) and len(v) <= 4 and all(isinstance(x, (int, float, str)) for x in v))


def flatten(d: dict, prefix: str = "", depth: int = 2) -> dict[str, Any]:
    """Scalar leaves of a nested dict, keys joined with dots (at most `depth` levels)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and depth > 0:
            out.update(flatten(v, key + ".", depth - 1))
        elif _is_scalar(v):
            out[key] = v
    return out


def table(rows: list[dict[str, Any]], first: str | None = None) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    if first and first in cols:
        cols.remove(first)
        cols.insert(0, first)
    if len(cols) > 12 and len(rows) <= 6:  # wide and short: transpose, one metric per line
        names = [_fmt(r.get(first, i)) if first else str(i) for i, r in enumerate(rows)]
        metric_rows = [{"metric": c, **{n: r.get(c, "") for n, r in zip(names, rows, strict=True)}}
                       for c in cols if c != first]
        return table(metric_rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _flat_dict(v: Any) -> bool:
    """A dict of scalars (or of dicts of scalars): one table row once flattened. Long lists inside (e.g. sample
    generations) do not count against it; they are left out of the table."""
    return isinstance(v, dict) and bool(v) and any(_is_scalar(x) for x in v.values()) and all(
        _is_scalar(x) or isinstance(x, list) or (isinstance(x, dict) and all(_is_scalar(y) for y in x.values()))
        for x in v.values())


def sections(data: dict, path: str = "") -> list[tuple[str, str, Any]]:
    """Walk a result JSON into (path, "facts" | "table", payload) sections, whatever its nesting.

    Scalars of a dict are its facts; sibling dicts that are flat (see `_flat_dict`) become the rows of one table
    (variants, backends, ...); lists of dicts become tables; deeper dicts are walked recursively.
    """
    out: list[tuple[str, str, Any]] = []
    facts = {k: v for k, v in data.items() if _is_scalar(v)}
    if facts:
        out.append((path, "facts", facts))
    flat = {k: v for k, v in data.items() if _flat_dict(v)}
    if len(flat) >= 2:
        out.append((path, "table", [{"name": k, **flatten(v)} for k, v in flat.items()]))
    else:
        out += [(f"{path}.{k}".lstrip("."), "facts", flatten(v)) for k, v in flat.items()]
    for k, v in data.items():
        sub = f"{path}.{k}".lstrip(".")
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out.append((sub, "table", [flatten(x) for x in v]))
        elif isinstance(v, dict) and k not in flat:
            out += sections(v, sub)
    return out


RATIO_WORDS = ("ratio", "speedup", "_over_")


def ratio_points(name: str, data: dict) -> list[tuple[str, float]]:
    """(label, value) of every ratio-like number (column names with ratio / speedup / _over_)."""
    pts = []
    for path, kind, payload in sections(data):
        rows = payload if kind == "table" else [payload]
        for i, row in enumerate(rows):
            ident = row.get("name") or ", ".join(f"{k}={row[k]}" for k in list(row)[:3]
                                                 if not isinstance(row[k], float) and not any(
                                                     w in k for w in RATIO_WORDS))
            for col, v in row.items():
                if any(w in col for w in RATIO_WORDS) and isinstance(v, (int, float)) and not isinstance(v, bool):
                    label = " ".join(x for x in (name, path, ident if kind == "table" else "", col) if x)
                    pts.append((label if kind == "table" or i == 0 else f"{label} {i}", float(v)))
    return pts


def plot_ratios(points: list[tuple[str, float]], path: Path) -> bool:
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.35 * len(points) + 1.2))
    labels = [p[0] for p in points]
    vals = [p[1] for p in points]
    ax.barh(range(len(points)), vals, color="tab:blue")
    if max(vals) / max(min(vals), 1e-9) > 50:
        ax.set_xscale("log")
    ax.axvline(1.0, color="k", lw=1)
    ax.set_yticks(range(len(points)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ratio to a baseline measured in the same run (direction: see its name)")
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.2f}x", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _header(ratios_png: bool) -> list[str]:
    """Machine, versions and backends (from `flythinker.info.collect`), and how to read the figures."""
    from flythinker.info import collect

    info = collect()
    v = info["versions"]
    load = os.getloadavg()
    lines = ["# flythinker benchmark report", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `flythinker bench`.", "",
             f"- Machine: {info['cpu']['machine']}, {info['cpu']['cores']} CPU cores (torch threads "
             f"{info['cpu']['torch_threads']}), GPUs: {', '.join(info['gpus']) or 'none'}; load average now "
             f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}",
             "- Versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k]),
             "- Kernel backends (CPU / CUDA): " + "; ".join(f"{op} {b['cpu']} / {b['cuda']}"
                                                           for op, b in info["backends"].items()),
             "- Every speed or memory figure below is a ratio to a baseline measured in the same run, on the same "
             "machine (absolute times on a shared machine drift between runs); each section lists its run facts "
             "(device, dtype, load average, baseline)."]
    return lines + (["", "![all ratios](ratios.png)", ""] if ratios_png else [""])


def _runs(runs: list[dict[str, Any]]) -> list[str]:
    cols = [c for c in ("name", "cmd", "rc", "seconds", "cpu_s", "load", "budget_s", "skipped")
            if any(c in r for r in runs)]
    lines = ["## Runs", "", table([{k: r.get(k, "") for k in cols} for r in runs]), ""]
    for r in runs:
        if r["rc"] != 0:
            lines += [f"`{r['name']}` failed (exit {r['rc']}); last output:", "", "```",
                      r["tail"].strip()[-1500:], "```", ""]
    return lines


def _result_section(path: Path) -> tuple[list[str], list[tuple[str, float]]]:
    """Markdown of one result JSON, and its ratio points."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"## {path.stem}", "", f"unreadable result file: {exc}", ""], []
    if is_pytest_benchmark(data):
        data = pytest_benchmark_summary(data)
    if not isinstance(data, dict):
        data = {"results": data}
    lines = [f"## {path.stem}", "", f"Source: `{path.name}`", ""]
    for where, kind, payload in sections(data):
        if kind == "facts":
            lines += [(f"**{where}**: " if where else "Run: ")
                      + "; ".join(f"{k} = {_fmt(x)}" for k, x in payload.items()), ""]
        else:
            lines += [f"### {where or path.stem}", "", table(payload, first="name"), ""]
    png = path.with_suffix(".png")
    if png.is_file():
        lines += [f"![{path.stem}]({png.name})", ""]
    return lines, ratio_points(path.stem, data)


def write_report(results_dir: Path, runs: list[dict[str, Any]] | None = None) -> Path:
    """Render every `*.json` in `results_dir` into `REPORT.md` (+ `ratios.png`); returns the report path."""
    from flythinker.hub import atomic_write_bytes

    body: list[str] = _runs(runs) if runs else []
    points: list[tuple[str, float]] = []
    jsons = sorted(results_dir.glob("*.json"))
    for path in jsons:
        lines, pts = _result_section(path)
        body += lines
        points += pts
    if not jsons:
        body += ["No result JSON found: run `flythinker bench` (or a script in benchmarks/) first.", ""]
    lines = _header(plot_ratios(points, results_dir / "ratios.png")) + body
    return atomic_write_bytes(results_dir / "REPORT.md", "\n".join(lines).encode())


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="build REPORT.md (tables + plots) from the result JSON of a folder")
    ap.add_argument("results_dir", nargs="?", type=Path, default=RESULTS, help="default: benchmarks/results")
    results_dir = ap.parse_args().results_dir
    if not results_dir.is_dir():  # never create a folder named by a typo
        ap.error(f"{results_dir} is not a folder")
    print(f"wrote {write_report(results_dir)}")
