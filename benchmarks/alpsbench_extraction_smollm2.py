"""SmolLM2-135M-Instruct as shipped, extracting memories (AlpsBench Task 1) on held-out sessions, against the
paper's 7 models' released outputs on the same sessions.

    .venv/bin/python -m benchmarks.alpsbench_extraction_smollm2 --data /work/data/alpsbench/annotation --sessions 40

Held-out sessions: ``flythinker.alpsbench.data.session_split(id) == "test"`` (one in five by SHA-256 of the id),
a seeded sample of ``--sessions`` of them. The model runs through
:class:`flythinker.alpsbench.predictors.ModelPredictor` (our extraction prompt, greedy, ``--max-new-tokens``);
unreadable outputs score 0 and are counted. Reported: mean record-matching score with bootstrap 95% CI for
SmolLM2 and each released model on the same sessions, parse failures, wall time. Results:
benchmarks/results/alpsbench_extraction_smollm2.json (and the run folder beside it).
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

from benchmarks._common import write_json

# `flythinker bench` contract (flythinker/cli/bench.py): no quick mode, and why
QUICK = {"skip": "a quality benchmark (SmolLM2 extracting memories from held-out sessions)"}

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    from flythinker.alpsbench import iter_packets
    from flythinker.alpsbench.data import session_split
    from flythinker.alpsbench.evaluate import PAPER_TASK1, score_released_task1
    from flythinker.alpsbench.predictors import ModelPredictor
    from flythinker.alpsbench.runner import run_task, task_rows
    from flythinker.empathy.backends import HFJudgeBackend

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--sessions", type=int, default=40)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "alpsbench_extraction_smollm2.json"))
    args = ap.parse_args()
    t0, load0 = time.time(), os.getloadavg()
    test = [p for p in iter_packets(args.data) if session_split(p.session_id) == "test" and p.task1_gold]
    sample = random.Random(args.seed).sample(test, min(args.sessions, len(test)))
    predictor = ModelPredictor(HFJudgeBackend(args.model, batch_size=4), max_new_tokens=args.max_new_tokens)
    run_dir = Path(args.out).with_suffix("")
    res = run_task(task_rows(sample, "task1"), predictor, run_dir, "task1", batch_size=4)
    released = score_released_task1(sample, list(PAPER_TASK1), matchers=("greedy",))
    report = {
        "what": "Task 1 extraction on held-out sessions: SmolLM2-135M-Instruct as shipped vs released outputs",
        "n_sessions": len(sample), "held_out_pool": len(test), "model": args.model,
        "smollm2": res.summary["metrics"], "smollm2_parse": res.summary["parse"],
        "released": {m: released[m]["greedy"]["algo"] for m in PAPER_TASK1},
        "wall_s": time.time() - t0, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "note": "mean_ci over sessions; the same sessions for every row",
    }
    write_json(Path(args.out), report)
    print(f"smollm2 {res.summary['metrics']['score']['mean']:.2f} {res.summary['metrics']['score']['ci95']} "
          f"parse {res.summary['parse']}")
    for m, v in report["released"].items():
        print(f"{m:28s} {v['mean']:.2f} {v['ci95']}")


if __name__ == "__main__":
    main()
