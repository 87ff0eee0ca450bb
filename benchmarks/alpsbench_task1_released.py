"""Does our Task 1 scorer reproduce the AlpsBench paper's extraction column from the released model outputs?

    .venv/bin/python -m benchmarks.alpsbench_task1_released --data /work/data/alpsbench/annotation
    .venv/bin/python -m benchmarks.alpsbench_task1_released --data ... --limit 50     # smoke

For every annotation packet that carries Task 1 gold memories and the 7 models' released parsed outputs, the
record-matching score of :func:`flythinker.alpsbench.score_record` (the paper's deterministic part: greedy
one-to-one matching, 0.6 quality + 0.4 F1) is averaged over sessions, with a bootstrap 95% CI, beside the paper's
Table 2 value; also the optimal-assignment matcher and (``--rule-judge``) a 50/50 blend with the deterministic
rule reviewer standing in for the paper's LLM judge. Results: benchmarks/results/alpsbench_task1_released.{json,png}.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from benchmarks._common import write_json

# `flythinker bench` contract (flythinker/cli/bench.py): no quick mode, and why
QUICK = {"skip": "scores released outputs from a local AlpsBench copy (--data), not a speed figure"}

RESULTS = Path(__file__).resolve().parent / "results"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(report["models"].items(), key=lambda kv: -kv[1]["paper"])
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar([x - 0.2 for x in xs], [r["paper"] for _, r in rows], 0.4, label="paper (Table 2)")
    ours = [r["greedy"]["algo"] for _, r in rows]
    ax.bar([x + 0.2 for x in xs], [o["mean"] for o in ours], 0.4, label="ours (greedy, 95% CI)",
           yerr=[[o["mean"] - o["ci95"][0] for o in ours], [o["ci95"][1] - o["mean"] for o in ours]], capsize=3)
    ax.set_xticks(list(xs), [name for name, _ in rows], rotation=20, fontsize=8)
    ax.set_ylabel("Task 1 extraction score (0-100)")
    ax.set_title(f"AlpsBench Task 1 on the released outputs ({report['n_sessions']} sessions)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from flythinker.alpsbench import iter_packets
    from flythinker.alpsbench.evaluate import PAPER_TASK1, score_released_task1

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the annotation packets folder (chunks/chunk_NNNN/sess_*.json)")
    ap.add_argument("--limit", type=int, default=None, help="first N packets only (smoke)")
    ap.add_argument("--rule-judge", action="store_true", help="also the 50/50 blend with the rule reviewer")
    ap.add_argument("--out", default=str(RESULTS / "alpsbench_task1_released.json"))
    args = ap.parse_args()
    t0 = time.time()
    load0 = os.getloadavg()
    packets = [p for p in iter_packets(args.data, args.limit) if p.task1_gold is not None]
    scored = score_released_task1(packets, list(PAPER_TASK1), with_rule_judge=args.rule_judge)
    greedy = {m: scored[m]["greedy"] for m in PAPER_TASK1}
    models = {m: {"paper": PAPER_TASK1[m], **scored[m], "diff": greedy[m]["algo"]["mean"] - PAPER_TASK1[m]}
              for m in PAPER_TASK1}
    paper_rank = sorted(PAPER_TASK1, key=lambda m: -PAPER_TASK1[m])
    our_rank = sorted(PAPER_TASK1, key=lambda m: -greedy[m]["algo"]["mean"])
    report = {
        "what": "AlpsBench Task 1 record-matching score of the 7 released model outputs vs the paper's Table 2",
        "n_sessions": len(packets), "models": models,
        "max_abs_diff": max(abs(r["diff"]) for r in models.values()),
        "within_3_points": all(abs(r["diff"]) <= 3 for r in models.values()),
        "paper_ranking": paper_rank, "our_ranking": our_rank, "same_ranking": paper_rank == our_rank,
        "wall_s": time.time() - t0, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "data": str(args.data),
    }
    out = Path(args.out)
    write_json(out, report)
    plot(report, out.with_suffix(".png"))
    for m in paper_rank:
        r = models[m]
        print(f"{m:28s} paper {r['paper']:6.2f}  ours {r['greedy']['algo']['mean']:6.2f} "
              f"[{r['greedy']['algo']['ci95'][0]:.2f}, {r['greedy']['algo']['ci95'][1]:.2f}]  diff {r['diff']:+.2f}")
    print(f"same ranking: {report['same_ranking']}; max |diff| {report['max_abs_diff']:.2f}; "
          f"{report['wall_s']:.0f} s -> {out}")


if __name__ == "__main__":
    main()
