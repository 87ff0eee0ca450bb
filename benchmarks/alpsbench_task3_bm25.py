"""BM25 on AlpsBench Task 3 (retrieval) at 100-1000 distractors, against the paper's nltk+bm25 row.

    .venv/bin/python -m benchmarks.alpsbench_task3_bm25 --data /work/data/alpsbench/annotation --sessions 500

Pools: each packet's own 100 distractors, grown to 300/500/700/1000 with memories drawn (seeded) from the other
sessions' human-verified Task 1 memories (:func:`flythinker.alpsbench.candidate_pool`; the paper's larger
tracks are built the same way but are not in the annotation repository, so the pools differ). Evaluated on a
seeded random sample of ``--sessions`` packets (the memory bank is all packets). Reported per level: strict
accuracy (chosen value = gold value), the public harness proxy (id or value match) and the paper's
retrieval-baseline grader (token overlap >= 0.2), each with a bootstrap 95% CI, beside the paper's BM25 row.
Results: benchmarks/results/alpsbench_task3_bm25.{json,png}.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

from benchmarks._common import write_json

# `flythinker bench` contract (flythinker/cli/bench.py): no quick mode, and why
QUICK = {"skip": "a retrieval-quality benchmark on a local AlpsBench copy (--data)"}

RESULTS = Path(__file__).resolve().parent / "results"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [int(n) for n in report["levels"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(levels, [report["paper_bm25"][str(n)] for n in levels], "k--o", label="paper nltk+bm25")
    for key, label in (("accuracy", "ours: strict (value match)"), ("paper_overlap", "ours: paper's overlap grader"),
                       ("harness", "ours: harness proxy (id or value)")):
        m = [report["levels"][str(n)][key]["mean"] for n in levels]
        lo = [report["levels"][str(n)][key]["ci95"][0] for n in levels]
        hi = [report["levels"][str(n)][key]["ci95"][1] for n in levels]
        ax.plot(levels, m, "-o", label=label)
        ax.fill_between(levels, lo, hi, alpha=0.2)
    ax.set_xlabel("distractor memories")
    ax.set_ylabel("retrieval accuracy")
    ax.set_title(f"AlpsBench Task 3, BM25 ({report['n_sessions']} sessions)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from flythinker.alpsbench import DISTRACTOR_LEVELS, iter_packets
    from flythinker.alpsbench.evaluate import PAPER_BM25, bm25_ranker, retrieval_accuracy

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the annotation packets folder")
    ap.add_argument("--sessions", type=int, default=500, help="seeded sample of sessions to evaluate (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "alpsbench_task3_bm25.json"))
    args = ap.parse_args()
    t0, load0 = time.time(), os.getloadavg()
    packets = list(iter_packets(args.data))
    sample = [p for p in packets if p.task3 is not None]
    if args.sessions and args.sessions < len(sample):
        sample = random.Random(args.seed).sample(sample, args.sessions)
    res = retrieval_accuracy(sample, bm25_ranker, DISTRACTOR_LEVELS, seed=args.seed, bank_packets=packets)
    report = {
        "what": "BM25 (bm25s, robertson k1=1.5 b=0.75, 179-word English stop list, NLTK Porter stemmer) on Task 3",
        "n_sessions": len(sample), "bank_sessions": len(packets), "seed": args.seed,
        "levels": {str(n): v for n, v in res.items()}, "paper_bm25": {str(n): v for n, v in PAPER_BM25.items()},
        "wall_s": time.time() - t0, "loadavg_start": load0, "loadavg_end": os.getloadavg(), "data": str(args.data),
    }
    out = Path(args.out)
    write_json(out, report)
    plot(report, out.with_suffix(".png"))
    for n, v in res.items():
        print(f"d{n:<5d} strict {v['accuracy']['mean']:.3f}  overlap {v['paper_overlap']['mean']:.3f}  "
              f"harness {v['harness']['mean']:.3f}  paper {PAPER_BM25[n]:.3f}")
    print(f"{report['wall_s']:.0f} s -> {out}")


if __name__ == "__main__":
    main()
