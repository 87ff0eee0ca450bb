"""How well does the default 135M judge agree with the rule-based metric on responses of known quality?

    .venv/bin/python -m benchmarks.empathy_judge               # the recorded run
    .venv/bin/python -m benchmarks.empathy_judge --items 4     # smoke

Responses of known quality: for each held-out ``persona-empathy`` record, four replies composed by the data
generator's own rule (:func:`flythinker.persona.compose_response`) for trait sets that match the user's hidden traits
in 0, 1, 2 or 3 of the 3 dimensions; the rule-based metric (fraction of traits :func:`classify_response` reads
correctly) is checked to equal that count / 3. The judge (PERM rubric, plain-response mode, the offline
SmolLM2-135M-Instruct through :class:`HFJudgeBackend`) sees the user's earlier conversation (where the traits show)
and the query. Modes: ``expected`` (probability-weighted score tokens; all items) and ``generate`` (parsed text; a
subset, to measure how often a 135M judge writes a parseable score at all).

Reported: Spearman rho of judge reward vs rule metric (all responses) and per dimension; within-record pairwise
accuracy (for two replies to the same request with different rule metric, how often the judge ranks the better one
higher; ties 1/2; chance 0.5) with a bootstrap 95% CI over records; baselines in the same run: response length in
words as the "judge", and a seeded random judge; the mean probability the judge puts on the score tokens; parse
failures; wall time and load. Results: benchmarks/results/empathy_judge.{json,png}.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import time
from pathlib import Path

# `flythinker bench` contract (flythinker/cli/bench.py): no quick mode, and why
QUICK = {"skip": "a quality benchmark (judge agreement): a few items measure nothing"}

RESULTS = Path(__file__).resolve().parent / "results"


def known_quality_items(n_items: int, seed: int = 0):
    """``[(context, response, rule_metric, record_index)]``: 4 replies per record with 0..3 traits matched."""
    from flythinker.empathy import context_from_record
    from flythinker.persona import TRAITS, compose_response, make_persona_empathy
    from flythinker.persona.metrics import classify_response

    recs = make_persona_empathy(n_users=60, queries_per_user=1, seed=seed, history_sessions=(1, 1))["test"]
    rng = random.Random(seed)
    out = []
    for i, rec in enumerate(recs[:n_items]):
        ctx = context_from_record(rec)
        truth = rec.persona.traits
        for k in range(4):
            flip = set(rng.sample(list(TRAITS), 3 - k))
            traits = {d: (v[1] if truth[d] == v[0] else v[0]) if d in flip else truth[d] for d, v in TRAITS.items()}
            text = compose_response(traits, rec.meta["topic"], rng)
            pred = classify_response(text)
            metric = sum(pred[d] == truth[d] for d in TRAITS) / 3
            if abs(metric - k / 3) > 1e-9:
                raise AssertionError(f"composed reply reads as {metric:.2f}, built for {k}/3: {text!r}")
            out.append((ctx, text, metric, i))
    return out


def pairwise_accuracy(scores, metrics, groups) -> tuple[float, list[float]]:
    """Within-group pairs with different metric: fraction ordered like the metric (ties 1/2); per-group values."""
    by: dict[int, list[tuple[float, float]]] = {}
    for s, m, g in zip(scores, metrics, groups):
        by.setdefault(g, []).append((s, m))
    per = []
    for pairs in by.values():
        hits = []
        for (s1, m1), (s2, m2) in itertools.combinations(pairs, 2):
            if m1 == m2:
                continue
            d = (s1 - s2) * (m1 - m2)
            hits.append(1.0 if d > 0 else 0.5 if d == 0 else 0.0)
        if hits:
            per.append(sum(hits) / len(hits))
    return (sum(per) / len(per) if per else float("nan")), per


def agreement(scores, metrics, groups) -> dict:
    from scipy.stats import spearmanr

    from flythinker.rl import bootstrap_ci

    ok = [(s, m, g) for s, m, g in zip(scores, metrics, groups) if s is not None]
    s, m, g = zip(*ok) if ok else ((), (), ())
    rho = float(spearmanr(s, m).statistic) if len(set(s)) > 1 else float("nan")
    acc, per = pairwise_accuracy(s, m, g)
    lo, hi = bootstrap_ci(per)[1:] if per else (float("nan"), float("nan"))
    return {"spearman": float(rho), "pairwise_accuracy": acc, "pairwise_ci95": [lo, hi], "n_scored": len(ok),
            "n_missing": len(scores) - len(ok)}


def run_judge(items, mode: str, max_new_tokens: int, batch_size: int):
    from flythinker.empathy import EmpathyJudge, HFJudgeBackend, get_rubric

    judge = EmpathyJudge(get_rubric("perm", analysis=False), HFJudgeBackend(batch_size=batch_size), mode=mode,
                         use_bystander=False, max_new_tokens=max_new_tokens)
    t = time.time()
    res = judge.score([r for _, r, _, _ in items], [c for c, _, _, _ in items])
    return res, judge.report(), time.time() - t


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    pts = result["expected"]["points"]
    a.scatter([p[1] + random.Random(i).uniform(-0.03, 0.03) for i, p in enumerate(pts)], [p[0] for p in pts], s=12)
    a.set_xlabel("rule metric (fraction of traits matched)")
    a.set_ylabel("judge reward (expected mode)")
    a.set_title(f"SmolLM2-135M judge vs rule: rho={result['expected']['agreement']['spearman']:.2f}")
    names = ["expected", "generate", "length_baseline", "random_baseline"]
    accs = [result[n]["agreement"]["pairwise_accuracy"] for n in names]
    accs = [0.0 if a != a else a for a in accs]  # NaN (nothing scored) drawn as an empty bar
    ci = [[0.0 if c != c else c for c in result[n]["agreement"]["pairwise_ci95"]] for n in names]
    err = [[max(0.0, a - c[0]) for a, c in zip(accs, ci)], [max(0.0, c[1] - a) for a, c in zip(accs, ci)]]
    b.bar(names, accs, yerr=err, capsize=3)
    b.axhline(0.5, color="gray", ls="--", lw=1, label="chance")
    b.set_ylim(0, 1)
    b.set_ylabel("within-request pairwise accuracy (95% CI)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=16, help="records (4 replies each) in expected mode")
    p.add_argument("--generate-items", type=int, default=4, help="records judged in generate mode")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "empathy_judge"))
    args = p.parse_args(argv)
    import torch

    from flythinker.hub import atomic_write_json

    torch.set_num_threads(args.threads)
    t0, load0 = time.time(), os.getloadavg()
    items = known_quality_items(args.items)
    metrics = [m for _, _, m, _ in items]
    groups = [g for _, _, _, g in items]
    result: dict = {"setup": vars(args) | {"judge": "SmolLM2-135M-Instruct (offline), PERM rubric, plain response, "
                                                    "no bystander (it does not see the user)"},
                    "n_responses": len(items)}
    res, rep, wall = run_judge(items, "expected", args.max_new_tokens, args.batch_size)
    result["expected"] = {"agreement": agreement([r.reward for r in res], metrics, groups), "report": rep,
                          "wall_s": wall, "points": [[r.reward, m] for r, m in zip(res, metrics)]}
    for d in ("resonation", "expression", "reception"):
        result["expected"][f"agreement_{d}"] = agreement([r.scores[d] for r in res], metrics, groups)
    sub = [it for it in items if it[3] < args.generate_items]
    res_g, rep_g, wall_g = run_judge(sub, "generate", args.max_new_tokens, args.batch_size)
    result["generate"] = {"agreement": agreement([r.reward for r in res_g], [it[2] for it in sub],
                                                 [it[3] for it in sub]),
                          "report": rep_g, "wall_s": wall_g, "n_responses": len(sub),
                          "sample_outputs": [r.raw for r in res_g[:2]]}
    result["length_baseline"] = {"agreement": agreement([len(r.split()) for _, r, _, _ in items], metrics, groups)}
    rng = random.Random(0)
    result["random_baseline"] = {"agreement": agreement([rng.random() for _ in items], metrics, groups)}
    result["wall_s"] = time.time() - t0
    result["loadavg"] = {"start": load0, "end": os.getloadavg()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), result)
    plot(result, out.with_suffix(".png"))
    for k in ("expected", "generate", "length_baseline", "random_baseline"):
        print(k, result[k]["agreement"])
    return result


if __name__ == "__main__":
    main()
