"""`flythinker alpsbench`: run one AlpsBench task on the annotation packets with a predictor and score it."""

from __future__ import annotations

import argparse
import json
import os
import sys

from flythinker.cli.common import CLIError, positive_int

HELP = "run and score an AlpsBench task (memory extraction, update, retrieval, utilisation)"
DESCRIPTION = ("Run one AlpsBench task on a folder of annotation packets (chunks/chunk_NNNN/sess_*.json; "
               "docs/alpsbench.md says how to fetch them) with a predictor, and score it: Task 1/2 by the paper's "
               "record-matching score, Task 3 by selection accuracy at --distractors, Task 4 by the grounding "
               "proxy. Resumable: predictions are appended to OUT/predictions.jsonl and a rerun skips those done. "
               "Prints the summary JSON (also OUT/summary.json).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="DIR", help="folder of AlpsBench annotation packets")
    p.add_argument("--task", required=True, choices=("task1", "task2", "task3", "task4"))
    p.add_argument("--ability", choices=("ability1", "ability2", "ability3", "ability4"), help="Task 4 ability")
    p.add_argument("--distractors", type=positive_int, default=100,
                   help="Task 3 distractors per query (default %(default)s; more are drawn from other sessions)")
    p.add_argument("--predictor", required=True,
                   help="bm25 (Task 3), released:MODEL (Task 1: the paper's released output of MODEL), hf (a local "
                        "model, --model), openai (--model at --base-url, key in $OPENAI_API_KEY)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model for hf/openai (default %(default)s)")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint for --predictor openai")
    p.add_argument("--max-new-tokens", type=positive_int, default=512)
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--limit", type=positive_int, default=None, help="first N sessions only")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (predictions, scores, summary)")


def _predictor(args, packets):
    from flythinker.alpsbench.predictors import BM25Predictor, ModelPredictor
    from flythinker.alpsbench.runner import ReleasedPredictor

    kind = args.predictor
    if kind.startswith("released:"):
        if args.task != "task1":
            raise CLIError("released:MODEL predictions exist for task1 only")
        return ReleasedPredictor(kind.split(":", 1)[1], packets)
    if kind == "bm25":
        if args.task != "task3":
            raise CLIError("the bm25 predictor answers task3 only")
        return BM25Predictor()
    from flythinker.empathy.backends import HFJudgeBackend, OpenAIJudgeBackend

    if kind == "openai":
        if not args.base_url:
            raise CLIError("--predictor openai needs --base-url")
        backend = OpenAIJudgeBackend(args.model, base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY"))
    elif kind == "hf":
        backend = HFJudgeBackend(args.model, batch_size=args.batch_size)
    else:
        raise CLIError(f"unknown --predictor {kind!r}: bm25, released:MODEL, hf or openai")
    return ModelPredictor(backend, max_new_tokens=args.max_new_tokens)


def run(args: argparse.Namespace) -> int:
    """Run `flythinker alpsbench`; returns the exit status."""
    from tqdm.auto import tqdm

    from flythinker.alpsbench.data import iter_packets
    from flythinker.alpsbench.runner import run_task, task_rows

    if args.task == "task4" and not args.ability:
        raise CLIError("--task task4 needs --ability")
    try:
        bank = list(iter_packets(args.data))
        packets = bank[:args.limit] if args.limit else bank
        predictor = _predictor(args, packets)
        rows = task_rows(packets, args.task, args.ability, args.distractors, bank)
        if not rows:
            raise CLIError(f"no {args.task} rows in {args.data}")
        meta = {"data": str(args.data), "predictor": args.predictor, "distractors": args.distractors,
                "ability": args.ability}
        res = run_task(rows, predictor, args.out, args.task, args.batch_size, progress=tqdm, meta=meta)
    except ValueError as exc:  # AlpsBenchDataError, a busy run folder, a bank too small for --distractors
        raise CLIError(str(exc)) from exc
    json.dump(res.summary, sys.stdout, indent=1)
    print()
    return 0
