"""`flythinker eval`: a pair on a held-out records file, against the same weights at lambda 0 and an optional
baseline model: per-user reply NLL, greedy replies' ROUGE-L and trait metric, 95% user-bootstrap intervals.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flythinker.cli.common import CLIError, positive_int, reply_records

HELP = "evaluate a pair on held-out records (NLL, ROUGE-L, traits; pair vs lambda 0 vs a baseline, 95%% CIs)"
DESCRIPTION = ("Score a FlyThinker pair on a records file (any supported format) against the same weights at "
               "lambda 0 and, optionally, a baseline model: per-user reply NLL, greedy replies' ROUGE-L and trait "
               "metric, paired differences with 95% user-bootstrap intervals. JSON out, a table printed.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the pair: a shipped name (smollm2-135m-persona-empathy) or a "
                   "flythinker checkpoint folder")
    p.add_argument("--data", required=True, help="records file (JSON/JSONL: flythinker, longlamp, personaemp, "
                   "perm); each record needs a reference response")
    p.add_argument("--baseline", help="a baseline model to compare with: a short name, an HF folder or a "
                   "flythinker checkpoint (e.g. a generator fine-tuned with the history in its prompt)")
    p.add_argument("--baseline-context", choices=("full", "query"), default="full",
                   help="what the baseline reads: full = history + query (default), query = the query only")
    p.add_argument("--generate", action="store_true", help="also decode greedy replies: ROUGE-L, trait metric")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--max-reasoner-tokens", type=positive_int, default=None,
                   help="the reasoner's prompt budget (default: a shipped pair's, else no cap)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N records")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--out", help="write the report (JSON, per-record rows included) here")
    p.add_argument("--plot", help="write a PNG of the summary here")


def _load_pair(spec: str):
    from flythinker.cli.common import checkpoint_type, load_checkpoint
    from flythinker.pretrained import is_shipped

    if is_shipped(spec):
        from flythinker.hub import load_tokenizer
        from flythinker.modeling import FlyThinkerForCausalLM
        from flythinker.pretrained import pair_info

        return (FlyThinkerForCausalLM.from_pretrained(spec).eval(), load_tokenizer(spec),
                pair_info(spec.lower()).get("max_reasoner_tokens"))
    if checkpoint_type(spec) != "flythinker":
        raise CLIError(f"--model {spec}: not a flythinker pair (a shipped name or a flythinker checkpoint folder)")
    model, tok = load_checkpoint(spec)
    return model.eval(), tok, None


def _load_baseline(spec: str):
    from flythinker.cli.common import checkpoint_type, load_checkpoint

    folder = Path(spec).expanduser()
    if folder.exists():
        checkpoint_type(spec)  # CLIError on a folder that is not a usable model
        return load_checkpoint(spec)[0].eval()
    from flythinker.hub import load_pretrained

    try:
        return load_pretrained(spec, with_tokenizer=False)[0].eval()
    except (OSError, ValueError, KeyError) as e:
        raise CLIError(f"--baseline {spec}: {e}") from None


def _records(args):
    return reply_records(args.data, "eval", (lambda rs: rs[: args.limit]) if args.limit else None)


def run(args: argparse.Namespace) -> int:
    """Run `flythinker eval`; returns the exit status."""
    from flythinker.evaluation import evaluate_pair, format_table, plot_report

    records = _records(args)
    pair, tok, budget = _load_pair(args.model)
    baseline = (_load_baseline(args.baseline), args.baseline_context) if args.baseline else None
    report = evaluate_pair(pair, tok, records, baseline=baseline, generate=args.generate,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                           max_reasoner_tokens=args.max_reasoner_tokens or budget,
                           log=lambda m: print(f"flythinker eval: {m}", file=sys.stderr, flush=True))
    report.update(model=args.model, data=args.data, baseline=args.baseline)
    print(format_table(report))
    if args.out:
        from flythinker.hub import atomic_write_json

        atomic_write_json(Path(args.out), report)
    if args.plot:
        plot_report(report, Path(args.plot))
    return 0
