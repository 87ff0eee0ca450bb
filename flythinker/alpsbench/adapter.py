"""AlpsBench's ``--predict-program`` adapter: one ``model_input`` row as JSON on stdin, one prediction row as
ASCII-safe JSON on stdout (the harness runs the program once per row and checks the keys exactly).

    python scripts/evaluate.py --task task3 --split dev --distractors 100 \\
        --predict-program python --predict-arg -m --predict-arg flythinker.alpsbench.adapter \\
        --predict-arg --backend --predict-arg bm25

Backends: ``bm25`` (Task 3 only, no model), ``hf`` (``--model``: a local model name/folder, default the offline
SmolLM2-135M-Instruct), ``openai`` (``--model`` at ``--base-url``, key from ``$OPENAI_API_KEY``). Bad input
exits with status 2 and one line on stderr; nothing is printed on stdout then.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def build_predictor(args: argparse.Namespace):
    """The predictor for ``--backend`` (see module doc)."""
    from .predictors import BM25Predictor, ModelPredictor

    if args.backend == "bm25":
        return BM25Predictor()
    from flythinker.empathy.backends import HFJudgeBackend, OpenAIJudgeBackend

    if args.backend == "openai":
        if not args.base_url:
            raise ValueError("--backend openai needs --base-url")
        backend = OpenAIJudgeBackend(args.model, base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY"))
    else:
        backend = HFJudgeBackend(args.model, batch_size=1)
    return ModelPredictor(backend, max_new_tokens=args.max_new_tokens)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flythinker.alpsbench.adapter", description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("bm25", "hf", "openai"), default="bm25")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--base-url", default=None)
    p.add_argument("--max-new-tokens", type=int, default=512)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        row = json.loads(sys.stdin.read())
        from .predictors import row_task

        row_task(row)
        prediction = build_predictor(args).predict([row])[0]
    except (ValueError, json.JSONDecodeError) as exc:
        print(f"flythinker-alpsbench-adapter: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    json.dump(prediction, sys.stdout, ensure_ascii=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
