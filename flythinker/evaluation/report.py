"""Evaluate a pair on persona records: per-user scores, 95% user-bootstrap intervals, paired differences.

    report = evaluate_pair(pair, tok, records, baseline=(model, "full"), generate=True)
    print(format_table(report)); plot_report(report, "eval.png")

Compared, on the same records: the pair (split context), the same weights at lambda 0 (the generator alone, the
reasoner's latents off), and an optional baseline model in the context its user names (e.g. a generator
fine-tuned with the history in its prompt: ``"full"``). Per record: the reference reply's NLL per token; with
``generate``: the greedy reply's ROUGE-L against the reference and, where records carry persona-empathy traits,
the trait metric. Scores are averaged per user first; intervals resample users (``scipy.stats.bootstrap``,
percentile, 95%), paired differences resample the per-user difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import nn

from .scoring import (
    generate_replies,
    reply_nll,
    rouge_l,
    spaced_punctuation,
    trait_hits,
)

PAIR, LAMBDA0, BASELINE = "pair", "lambda0", "baseline"


def per_user(rows: Sequence[dict], key: str) -> dict[str, float]:
    """``{user: mean of row[key]}`` over rows that have `key`."""
    acc: dict[str, list[float]] = {}
    for r in rows:
        if key in r:
            acc.setdefault(r["user"], []).append(float(r[key]))
    return {u: sum(v) / len(v) for u, v in acc.items()}


def user_bootstrap(values: Sequence[float], *, n_resamples: int = 2000, seed: int = 0,
                   confidence: float = 0.95) -> dict[str, Any]:
    """``{"mean", "ci95": [lo, hi], "users"}`` of per-user values: the mean, and the percentile interval of
    resampled users (scipy.stats.bootstrap, seeded; `confidence` 0.95 unless given, the key keeps its name). One
    user or identical values: the interval is the mean itself. The one bootstrap of the library
    (``flythinker.rl.bootstrap_ci`` returns the same as a tuple)."""
    from scipy.stats import bootstrap

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("user_bootstrap needs at least one user")
    mean = float(x.mean())
    if x.size == 1 or np.all(x == x[0]):
        return {"mean": mean, "ci95": [mean, mean], "users": int(x.size)}
    res = bootstrap((x,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                    rng=np.random.default_rng(seed), vectorized=True)
    return {"mean": mean, "ci95": [float(res.confidence_interval.low), float(res.confidence_interval.high)],
            "users": int(x.size)}


def paired(a: dict[str, float], b: dict[str, float]) -> dict[str, Any]:
    """Bootstrap of the per-user difference a - b over the users both have."""
    users = sorted(set(a) & set(b))
    return user_bootstrap([a[u] - b[u] for u in users])


def _score_rows(model, tok, records, context: str, args: dict, lam: float | None = None) -> list[dict]:
    knobs = {"fusion_lambda": lam} if lam is not None else {}
    rows = reply_nll(model, tok, records, context=context, max_reasoner_tokens=args["max_reasoner_tokens"],
                     batch_size=args["batch_size"], **knobs)
    for r in rows:
        r["nll_per_token"] = r["nll"] / max(1, r["tokens"])
    if args["generate"]:
        texts = generate_replies(model, tok, records, context=context, max_new_tokens=args["max_new_tokens"],
                                 max_reasoner_tokens=args["max_reasoner_tokens"], batch_size=args["batch_size"],
                                 **knobs)
        for row, rec, text in zip(rows, records, texts, strict=True):
            row.update(reply=text, rouge_l=rouge_l(text, rec.response),
                       spaced_punctuation=float(spaced_punctuation(text)), **trait_hits(text, rec))
    return rows


METRICS = ("nll_per_token", "rouge_l", "strategy", "register", "length", "spaced_punctuation")


def summarise(rows_by_model: dict[str, list[dict]]) -> tuple[dict, dict]:
    """(per model {metric: bootstrap}, per (pair - other) {metric: paired bootstrap})."""
    summary: dict[str, dict] = {}
    users: dict[str, dict[str, dict[str, float]]] = {}
    for name, rows in rows_by_model.items():
        users[name] = {m: per_user(rows, m) for m in METRICS}
        summary[name] = {m: user_bootstrap(list(v.values())) for m, v in users[name].items() if v}
    diffs = {f"{PAIR}-{other}": {m: paired(users[PAIR][m], users[other][m]) for m in METRICS
                                 if users[PAIR][m] and users[other][m]}
             for other in rows_by_model if other != PAIR}
    return summary, diffs


def evaluate_pair(pair: nn.Module, tok, records: Sequence, *, baseline: tuple[nn.Module, str] | None = None,
                  generate: bool = False, max_new_tokens: int = 64, max_reasoner_tokens: int | None = None,
                  batch_size: int = 8, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The report (module docstring) as a JSON-able dict: ``rows`` per model, ``summary``, ``differences``."""
    if not records:
        raise ValueError("evaluate_pair needs at least one record")
    args = {"max_new_tokens": max_new_tokens, "max_reasoner_tokens": max_reasoner_tokens,
            "batch_size": batch_size, "generate": generate}
    rows: dict[str, list[dict]] = {PAIR: _score_rows(pair, tok, records, "split", args)}
    _log(log, f"pair scored on {len(records)} records")
    rows[LAMBDA0] = _score_rows(pair, tok, records, "split", args, lam=0.0)
    _log(log, "lambda 0 scored")
    if baseline is not None:
        rows[BASELINE] = _score_rows(baseline[0], tok, records, baseline[1], args)
        _log(log, f"baseline ({baseline[1]} context) scored")
    summary, diffs = summarise(rows)
    return {"records": len(records), "users": len({r.user_id for r in records}), "generate": generate,
            "baseline_context": baseline[1] if baseline else None, "summary": summary, "differences": diffs,
            "rows": rows}


def _log(log, msg: str) -> None:
    if log is not None:
        log(msg)


def _cell(s: dict | None, scale: float) -> str:
    if s is None or any(isinstance(v, float) and math.isnan(v) for v in [s["mean"], *s["ci95"]]):
        return "-"
    return f"{s['mean'] * scale:.3g} [{s['ci95'][0] * scale:.3g}, {s['ci95'][1] * scale:.3g}]"


def format_table(report: dict) -> str:
    """The report's summary and paired differences as a text table (traits and ROUGE-L in %)."""
    metrics = [m for m in METRICS if any(m in s for s in report["summary"].values())]
    scale = {m: (1.0 if m == "nll_per_token" else 100.0) for m in metrics}
    lines = [f"{report['users']} users, {report['records']} records; mean [95% user-bootstrap CI]"
             + ("" if len(metrics) == 1 else "; ROUGE-L and traits in %"),
             f"{'':18s}" + "".join(f"{m:>26s}" for m in metrics)]
    for name, s in {**report["summary"], **report["differences"]}.items():
        lines.append(f"{name:18s}" + "".join(f"{_cell(s.get(m), scale[m]):>26s}" for m in metrics))
    return "\n".join(lines)


def plot_report(report: dict, path) -> None:
    """Bar chart of each model's metrics with their 95% intervals (PNG at `path`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if m != "spaced_punctuation" and any(m in s for s in report["summary"].values())]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        names = [n for n, s in report["summary"].items() if m in s]
        means = [report["summary"][n][m]["mean"] for n in names]
        lo = [mu - report["summary"][n][m]["ci95"][0] for n, mu in zip(names, means, strict=True)]
        hi = [report["summary"][n][m]["ci95"][1] - mu for n, mu in zip(names, means, strict=True)]
        ax.bar(names, means, yerr=[lo, hi], capsize=4, color=["C0", "C1", "C2"][:len(names)])
        ax.set_title(m)
        if m in ("strategy", "register", "length"):
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    fig.suptitle(f"{report['users']} users, 95% user-bootstrap intervals")
    fig.tight_layout()
    import io

    from flythinker.hub import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


__all__ = ["BASELINE", "LAMBDA0", "METRICS", "PAIR", "evaluate_pair", "format_table", "paired", "per_user",
           "plot_report", "summarise", "user_bootstrap"]
