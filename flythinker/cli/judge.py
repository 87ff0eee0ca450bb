"""`flythinker judge FILE --rubric perm|peregrm`: score the responses in a data file with an empathy judge."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from flythinker.cli.common import CLIError
from flythinker.cli.options import (
    judge_score_float,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    prob_float,
)

HELP = "score responses with a PERM- or PereGRM-style empathy judge"
DESCRIPTION = (
    "Score the responses of a JSON/JSONL file with an empathy judge and print a per-dimension summary. Layouts: "
    "flythinker records (the record's response), PERM (the dialogue's last assistant turn), PersonaEmp (the "
    "conversation's last assistant turn). Backends: the local SmolLM2-135M-Instruct (default; a weak judge: see "
    "benchmarks/results/empathy_judge.json), any local HF model folder, or an OpenAI-compatible endpoint "
    "(--base-url). Unparsed judge outputs are counted and reported; --fallback-score replaces them only when given.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="JSON / JSONL file of records with responses")
    p.add_argument("--rubric", choices=("perm", "peregrm"), default=None,
                   help="default: perm; peregrm (fixed criteria) with --predictions")
    p.add_argument("--predictions", default=None,
                   help="PersonaEmp protocol: judge this predictions file (the authors' aligned layout, or "
                        "query_id/response rows) against fixed criteria; FILE is then the PersonaEmp data")
    p.add_argument("--criteria", default=None,
                   help="PersonaEmp protocol: the criteria sidecar file; missing criteria are written into it "
                        "first (resumable, atomic); without it the data's own criteria are used")
    p.add_argument("--format", default="auto", choices=("auto", "flythinker", "perm", "personaemp"),
                   help="input layout (default: detected from the first record)")
    p.add_argument("--backend", choices=("hf", "openai"), default=None,
                   help="judge backend (default: openai when --base-url is given, else hf)")
    p.add_argument("--judge-model", default="smollm2-135m-instruct",
                   help="hf: a known short name or local folder; openai: the served model name")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8765/v1")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--mode", choices=("generate", "expected"), default=None,
                   help="generate: parse the judge's text; expected: probability-weighted score tokens (hf only; "
                        "default for hf)")
    p.add_argument("--rules", choices=("authors", "strict"), default="strict",
                   help="scoring rules: authors = each rubric's repository (first/last occurrence, accepted forms, "
                        "batch-mean / fixed fallbacks, their judge sampling); strict = checked scale and "
                        "denominators, failures counted and left without a reward (see docs/empathy.md)")
    p.add_argument("--role", choices=("training", "evaluation"), default=None,
                   help="which of the papers' judge settings apply by default (default: evaluation with "
                        "--fixed-criteria, else training)")
    p.add_argument("--trials", type=positive_int, default=None,
                   help="samples per dimension (default: the rules' setting; > 1 needs --temperature > 0)")
    p.add_argument("--temperature", type=nonneg_float, default=None, help="default: the rules' setting for --role")
    p.add_argument("--top-p", type=prob_float, default=None, help="default: the rules' setting for --role")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="cap on each judge output, criteria calls included (default: the rules' setting)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="hf: prompts per forward")
    p.add_argument("--timeout", type=positive_float, default=60.0, help="openai: seconds per request")
    p.add_argument("--max-retries", type=nonneg_int, default=3, help="openai: retries per request")
    p.add_argument("--concurrency", type=positive_int, default=4, help="openai: requests in flight")
    p.add_argument("--policy-format", choices=("response", "analysis_response"), default="response",
                   help="analysis_response: responses are '# Analysis ... # Response ...' (PERM); resonation "
                        "judges the analysis")
    p.add_argument("--aggregation", choices=("mean", "harmonic", "geometric"), default="harmonic")
    p.add_argument("--bystander-coef", type=nonneg_float, default=0.5,
                   help="weight of the bystander penalty coef * (B/100 - 1), >= 0 (default: %(default)s)")
    p.add_argument("--no-bystander", action="store_true", help="skip the bystander judge")
    p.add_argument("--fixed-criteria", action="store_true",
                   help="peregrm: criteria written once per query (evaluation) instead of per call")
    p.add_argument("--min-score-mass", type=prob_float, default=None,
                   help="expected mode: least probability on the score tokens that counts as a score; below it the "
                        "dimension is a counted failure (default: flythinker.empathy.MIN_SCORE_MASS, 0.05)")
    p.add_argument("--fallback-score", type=judge_score_float, default=None,
                   help="explicit fallback for unparsed dimension scores (1-5); the bystander gets 20x it")
    p.add_argument("--limit", type=positive_int, default=None, help="judge only the first N items")
    p.add_argument("--out", default=None, help="write per-item scores as JSON lines here (an existing file needs "
                                               "--overwrite; checked before judging)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _backend(args: argparse.Namespace):
    import os

    from flythinker.empathy import HFJudgeBackend, OpenAIJudgeBackend

    kind = args.backend or ("openai" if args.base_url else "hf")
    if kind == "openai":
        if not args.base_url:
            raise CLIError("--backend openai needs --base-url")
        if args.mode == "expected":
            raise CLIError("--mode expected needs token probabilities: use the hf backend")
        return OpenAIJudgeBackend(args.judge_model, base_url=args.base_url, api_key=os.environ.get(args.api_key_env),
                                  timeout=args.timeout, max_retries=args.max_retries,
                                  max_concurrency=args.concurrency), "generate"
    return HFJudgeBackend(args.judge_model, batch_size=args.batch_size), args.mode or "expected"


def _summary(results, rubric, out=None) -> dict:
    import statistics

    out = out or sys.stdout

    names = [d.name for d in rubric.dimensions] + (["bystander"] if rubric.bystander else [])
    rows = {}
    for name in names + ["reward"]:
        vals = [r.reward if name == "reward" else r.scores.get(name) for r in results]
        got = [v for v in vals if v is not None]
        rows[name] = {"n": len(got), "missing": len(vals) - len(got),
                      "mean": statistics.fmean(got) if got else None,
                      "sd": statistics.stdev(got) if len(got) > 1 else None}
    print(f"{'dimension':12s} {'n':>5s} {'missing':>8s} {'mean':>8s} {'sd':>8s}", file=out)
    for name, s in rows.items():
        if s["n"] == 0 and s["missing"] == 0:
            continue
        mean = f"{s['mean']:.3f}" if s["mean"] is not None else "-"
        sd = f"{s['sd']:.3f}" if s["sd"] is not None else "-"
        print(f"{name:12s} {s['n']:5d} {s['missing']:8d} {mean:>8s} {sd:>8s}", file=out)
    return rows


def _judge(args: argparse.Namespace, rubric, backend, mode: str):
    from flythinker.empathy import MIN_SCORE_MASS, EmpathyJudge

    fallback = None if args.fallback_score is None else {"dimension": args.fallback_score,
                                                        "bystander": min(100.0, 20 * args.fallback_score)}
    min_mass = MIN_SCORE_MASS if args.min_score_mass is None else args.min_score_mass
    if args.rules == "authors" and fallback is not None:
        raise CLIError("--fallback-score needs --rules strict (authors substitutes failures as the authors do)")
    try:
        judge = EmpathyJudge(rubric, backend, mode=mode, rules=args.rules,
                             role=args.role or ("evaluation" if args.fixed_criteria else "training"),
                             trials=args.trials, temperature=args.temperature, top_p=args.top_p,
                             max_new_tokens=args.max_new_tokens, policy_format=args.policy_format,
                             fallback=fallback, use_bystander=False if args.no_bystander else None,
                             min_score_mass=min_mass)
        judge.check_backend()  # expected mode: every score scale is single tokens, checked before judging
    except ValueError as exc:
        raise CLIError(f"--judge-model {args.judge_model}: {exc}") from None
    return judge


def _protocol_judge(args: argparse.Namespace):
    import dataclasses

    from flythinker.empathy import MIN_SCORE_MASS, EmpathyJudge, get_rubric
    from flythinker.empathy.rules import default_settings

    if args.rubric == "perm":
        raise CLIError("--predictions judges under PersonaEmp's protocol (fixed criteria): --rubric peregrm")
    if args.fallback_score is not None:
        raise CLIError("--fallback-score does not apply to --predictions (unparsed scores are left out)")
    backend, mode = _backend(args)
    crit = default_settings(args.rules, "peregrm", "criteria")
    if args.max_new_tokens is not None:  # the cap applies to the criteria calls too
        crit = dataclasses.replace(crit, max_new_tokens=args.max_new_tokens)
    try:
        judge = EmpathyJudge(get_rubric("peregrm", dynamic_criteria=False, aggregation="mean"), backend, mode=mode,
                             rules=args.rules, role="evaluation", trials=args.trials, temperature=args.temperature,
                             top_p=args.top_p, max_new_tokens=args.max_new_tokens, use_bystander=False,
                             criteria_settings=crit,
                             min_score_mass=MIN_SCORE_MASS if args.min_score_mass is None else args.min_score_mass)
        judge.check_backend()
    except ValueError as exc:
        raise CLIError(f"--judge-model {args.judge_model}: {exc}") from None
    return judge, backend, mode


def _run_protocol(args: argparse.Namespace, path: Path) -> int:
    from filelock import Timeout

    from flythinker.empathy import JudgeBackendError, protocol
    from flythinker.run_folder import RunFolderError, output_file

    if not Path(args.predictions).is_file():
        raise CLIError(f"no such file: {args.predictions}")
    held = output_file(args.out, overwrite=args.overwrite) if args.out else contextlib.nullcontext()
    try:
        with held as out:  # checked (and locked) before any judging
            judge, backend, mode = _protocol_judge(args)
            records, results, rep = _protocol_eval(args, path, judge, protocol)
            print(f"{len(results)} responses judged under PersonaEmp's protocol ({backend.name}:{backend.model_name}"
                  f", mode {mode}, rules {args.rules})")
            print(protocol.format_report(rep))
            print("judge outputs: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in sorted(judge.report().items())))
            if out is not None:
                items = [{"session_id": rec.user_id, "query_id": rec.record_id, "category": rec.query.category,
                          "scores": r.scores, "failures": r.failures, "judge": r.raw}
                         for rec, r in zip(records, results)]
                out.write_bytes(json.dumps({"report": rep, "items": items}, ensure_ascii=False).encode())
                print(f"per-item scores: {args.out}")
    except RunFolderError as exc:
        raise CLIError(f"--out {args.out}: {exc}") from None
    except Timeout:
        raise CLIError(f"{args.criteria} is being written by another process (its .lock is held)") from None
    except JudgeBackendError as exc:
        raise CLIError(str(exc)) from None
    return 0


def _protocol_eval(args, path: Path, judge, protocol):
    """(records judged, results, report): criteria written first when --criteria is given."""
    try:
        sessions, records = protocol.load_sessions(path)
        if args.criteria:
            counts = protocol.write_criteria(sessions, records, args.criteria, judge, limit=args.limit)
            print(f"criteria: {counts['written']} written, {counts['present']} present, {counts['failed']} failed "
                  f"-> {args.criteria}")
        n = args.limit or len(records)
        crit = protocol.read_criteria(args.criteria, records, limit=n)
        responses = protocol.read_predictions(args.predictions, sessions, records)[:n]
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    results, rep = protocol.evaluate(records[:n], responses, crit, judge, batch_size=args.batch_size)
    return records[:n], results, rep


def run(args: argparse.Namespace) -> int:
    from flythinker.empathy import get_rubric, judge_items
    from flythinker.run_folder import RunFolderError, output_file

    path = Path(args.file)
    if not path.is_file():
        raise CLIError(f"no such file: {path}")
    if args.predictions:
        return _run_protocol(args, path)
    if args.criteria:
        raise CLIError("--criteria needs --predictions (PersonaEmp's evaluation protocol)")
    args.rubric = args.rubric or "perm"
    try:
        items = judge_items(path, format=args.format)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    items = items[: args.limit] if args.limit else items
    rubric = (get_rubric("perm", analysis=args.policy_format == "analysis_response", aggregation=args.aggregation,
                         bystander_coef=args.bystander_coef) if args.rubric == "perm"
              else get_rubric("peregrm", dynamic_criteria=not args.fixed_criteria, bystander_coef=args.bystander_coef,
                           aggregation=args.aggregation))
    held = output_file(args.out, overwrite=args.overwrite) if args.out else contextlib.nullcontext()
    try:
        with held as out:  # checked (and locked) before any judging: a bad --out fails at once
            backend, mode = _backend(args)
            judge = _judge(args, rubric, backend, mode)
            results = _score_all(judge, items, args.batch_size)
            _report(args, items, results, rubric, backend, mode, judge, out)
    except RunFolderError as exc:
        raise CLIError(f"--out {args.out}: {exc}") from None
    return 0


def _score_all(judge, items, batch_size: int) -> list:
    from tqdm.auto import tqdm

    from flythinker.empathy import JudgeBackendError

    results = []
    step = max(1, batch_size)
    for s in tqdm(range(0, len(items), step), desc="judging", unit="batch", file=sys.stderr):
        chunk = items[s:s + step]
        try:
            results += judge.score([r for _, r in chunk], [c for c, _ in chunk])
        except JudgeBackendError as exc:
            raise CLIError(str(exc)) from None
    return results


def _report(args, items, results, rubric, backend, mode, judge, out) -> None:
    print(f"{len(items)} responses judged with {rubric.name} ({backend.name}:{backend.model_name}, mode {mode}, "
          f"rules {args.rules})")
    _summary(results, rubric)
    rep = judge.report()
    print("judge outputs: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in sorted(rep.items())))
    if out is not None:
        lines = [json.dumps({"item_id": c.item_id, "scores": r.scores, "reward": r.reward, "failures": r.failures,
                             "fallbacks": r.fallbacks, "criteria": r.criteria}) for (c, _), r in zip(items, results)]
        out.write_bytes(("\n".join(lines) + "\n").encode())
        print(f"per-item scores: {args.out}")
