"""The quality-cost plane: is flythinker worth it against putting the history in the generator's prompt?

    python -m benchmarks.quality_cost_plane [--histories 150,1000] [--users 3] [--rounds 2] [--new-tokens 64]

Quality is the held-out strategy accuracy (greedy replies of test users whose phrasing families were never trained
on, or the likelihood preference where replies were not generated; 95% user-bootstrap interval) that
`python -m benchmarks.personalization_v2 eval` wrote to benchmarks/results/personalization_v2.json; it is read,
not re-measured. Cost is measured here, in one run on this
machine: the wall time of one reply (batch 1, greedy, exactly `--new-tokens` new tokens with eos off, fp32 CPU)
through the demo's call (`flythinker.cli.common.generate_text`), at a history of about 150 and about 1,000 tokens.
Variants, interleaved with a rotating order:

  a   the generator alone (SmolLM2-135M-Instruct; the LoRA merged costs the same): reads the query only
  b   the generator with the history in its prompt: reads history + query
  c   flythinker: the shipped pair as `from_pretrained` loads it (one shared base) for the cost, the reasoner
      reading history + query and the generator the query; its quality point is the benchmark's variant c (the
      library recipe trained on persona-empathy v2), which has the same architecture and so the same cost
  c8  the shipped pair's generator with a reasoner of SmolLM2's first 8 layers (flythinker.truncate): cost only,
      no trained k-layer pair exists, so it has no quality point

The histories are real persona-empathy v2 test turns (several users' turns in a row until the token target is
reached), so the token counts are those of the data the pair reads. Results: benchmarks/results/
quality_cost_plane.json + .png, with the load average around every call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks._common import RESULTS, write_json
from benchmarks.shipped_pair_decode import one_call

QUICK = {"args": ["--histories", "150", "--users", "1", "--rounds", "1", "--new-tokens", "8",
                  "--out", "{results}/quality_cost_plane"], "seconds": 120}

SHIPPED = "smollm2-135m-persona-empathy"
QUALITY = RESULTS / "personalization_v2.json"
LABELS = {"a": "a: generator, query only", "b": "b: history in the prompt", "c": "c: flythinker (recipe pair)",
          "c8": "c8: flythinker, 8-layer reasoner"}


def load_models(reasoner_layers: int) -> tuple[dict, object]:
    """{variant: model} and the tokenizer."""
    from flythinker import FlyThinkerForCausalLM
    from flythinker.hub import load_pretrained, load_tokenizer
    from flythinker.pretrained import pair_info
    from flythinker.truncate import truncated_reasoner

    info = pair_info(SHIPPED)
    base, _ = load_pretrained(info["base"])
    pair = FlyThinkerForCausalLM.from_pretrained(SHIPPED).eval()
    two = FlyThinkerForCausalLM.from_pretrained(SHIPPED, shared_base=False).eval()
    short = FlyThinkerForCausalLM.from_pair(two.generator, truncated_reasoner(two.reasoner, reasoner_layers),
                                            **info["fusion"]).eval()
    return {"a": base.eval(), "b": base.eval(), "c": pair, "c8": short}, load_tokenizer(SHIPPED)


def long_records(users: int, history_tokens: int, tok) -> list:
    """`users` test records whose history is extended with other test users' turns (oldest first) until the
    reasoner's view reaches about `history_tokens` tokens beyond the query alone."""
    from flythinker.persona import build_views, load_dataset

    test = load_dataset("persona-empathy", "test", version=2)
    pool = [t for r in test for t in r.history]
    out = []
    for u in range(users):
        r = test[u * 7 % len(test)]
        bare = len(build_views(dataclasses.replace(r, history=[]), tok, mode="split", warn=False).reasoner_prompt_ids)
        history, i = list(r.history), u * 31
        while len(build_views(dataclasses.replace(r, history=history), tok, mode="split",
                              warn=False).reasoner_prompt_ids) - bare < history_tokens:
            history.insert(0, pool[i % len(pool)])
            i += 1
        out.append(dataclasses.replace(r, history=history))
    return out


def prompts_for(variant: str, record, tok):
    from flythinker.cli.common import Prompts
    from flythinker.persona import build_views

    v = build_views(record, tok, mode="split", warn=False)
    full = torch.tensor([v.reasoner_prompt_ids])
    if variant == "a":
        return Prompts(torch.tensor([v.generator_prompt_ids]))
    if variant == "b":
        return Prompts(full)
    return Prompts(torch.tensor([v.generator_prompt_ids]), full)


def measure(models: dict, tok, history_tokens: int, args) -> dict:
    """Per variant: median seconds per reply, median first-token seconds, prompt sizes, the loads seen."""
    records = long_records(args.users, history_tokens, tok)
    names = list(models)
    calls: dict[str, list[dict]] = {n: [] for n in names}
    sizes: dict[str, list[int]] = {n: [] for n in names}
    for r in range(args.rounds):
        for u, rec in enumerate(records):
            k = (u + r) % len(names)
            for name in names[k:] + names[:k]:
                p = prompts_for(name, rec, tok)
                c = one_call(models[name], p, tok, args.new_tokens, fixed=True)
                calls[name].append(c)
                sizes[name].append(p.reasoner.shape[1] if p.reasoner is not None else p.generator.shape[1])
                print(f"  [h{history_tokens} r{r} u{u}] {name:3s} {c['seconds']:6.2f} s  first "
                      f"{c['first_token_s']:.2f} s  load {c['load'][0]:.1f}", flush=True)
    return {n: {"seconds_median": statistics.median(c["seconds"] for c in cs),
                "first_token_s_median": statistics.median(c["first_token_s"] for c in cs),
                "longest_prompt_tokens": max(sizes[n]), "calls": len(cs),
                "load_max": max(x for c in cs for x in c["load"])} for n, cs in calls.items()}


def quality(path: Path) -> dict:
    """{variant: held-out strategy accuracy {mean, ci95, metric}} from the personalisation benchmark's results:
    greedy generation where it was scored, else the likelihood preference (`metric` says which)."""
    if not path.exists():
        return {}
    variants = json.loads(path.read_text()).get("variants", {})
    out = {}
    for name in ("a", "b", "c"):
        for metric in ("heldout_generation", "heldout_preference"):
            s = variants.get(name, {}).get(metric, {}).get("strategy")
            if s:
                out[name] = {"mean": s["mean"], "ci95": s["ci95"], "metric": metric}
                break
    return out


def frontier(points: dict[str, tuple[float, float]]) -> list[str]:
    """The variants no other variant beats on both axes (cheaper or equal and at least as good, one strictly)."""
    return [n for n, (c, q) in points.items()
            if not any((c2 <= c and q2 >= q) and (c2 < c or q2 > q) for m, (c2, q2) in points.items() if m != n)]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hs = list(report["cost"])
    fig, axes = plt.subplots(1, len(hs), figsize=(6 * len(hs), 4.5), squeeze=False)
    q = report["quality"]
    for ax, h in zip(axes[0], hs, strict=True):
        for name, row in report["cost"][h].items():
            x = row["seconds_median"]
            if name in q:
                lo, hi = q[name]["ci95"]
                ax.errorbar(x, q[name]["mean"], yerr=[[q[name]["mean"] - lo], [hi - q[name]["mean"]]], fmt="o",
                            capsize=4, label=LABELS[name])
            else:
                ax.axvline(x, ls=":", color="grey")
                ax.text(x, 0.52, f" {name}: cost only", rotation=90, fontsize=7, va="bottom")
        ax.axhline(0.5, color="grey", ls="--", lw=0.8)
        ax.set_xlabel(f"seconds per reply ({report['new_tokens']} new tokens, batch 1, CPU)")
        metrics = sorted({v["metric"].removeprefix("heldout_") for v in q.values()}) or ["none"]
        ax.set_ylabel(f"held-out strategy accuracy ({' / '.join(metrics)}, 95% CI)")
        ax.set_title(f"history ~{h} tokens", fontsize=9)
        ax.set_ylim(0.3, 1.02)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("quality against the cost of one reply (SmolLM2-135M, persona-empathy v2, held-out families)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--histories", default="150,1000", help="history sizes in tokens, comma-separated")
    ap.add_argument("--users", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reasoner-layers", type=int, default=8)
    ap.add_argument("--quality", default=str(QUALITY))
    ap.add_argument("--out", default=str(RESULTS / "quality_cost_plane"))
    args = ap.parse_args(argv)
    start = time.perf_counter()
    models, tok = load_models(args.reasoner_layers)
    warm = long_records(1, 20, tok)[0]
    for name, m in models.items():  # warm-up: first-call allocations, the pair's parallel-mode decision
        one_call(m, prompts_for(name, warm, tok), tok, 4, True)
    report = {"pair": SHIPPED, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
              "new_tokens": args.new_tokens, "users": args.users, "rounds": args.rounds,
              "load_start": os.getloadavg()[0], "quality_source": str(args.quality),
              "quality": quality(Path(args.quality)), "cost": {}}
    for h in (int(x) for x in args.histories.split(",")):
        report["cost"][str(h)] = measure(models, tok, h, args)
    report["frontier"] = {h: frontier({n: (row["seconds_median"], report["quality"][n]["mean"])
                                       for n, row in rows.items() if n in report["quality"]})
                          for h, rows in report["cost"].items()}
    for rows in report["cost"].values():
        base = rows["a"]["seconds_median"]
        for row in rows.values():
            row["ratio_to_a"] = row["seconds_median"] / base
    report["load_end"] = os.getloadavg()[0]
    report["wall_seconds"] = time.perf_counter() - start
    out = Path(args.out)
    write_json(out.with_suffix(".json"), report)
    plot(report, out.with_suffix(".png"))
    for h, rows in report["cost"].items():
        print(f"history ~{h}: " + ", ".join(f"{n} {r['seconds_median']:.2f} s ({r['ratio_to_a']:.2f}x a)"
                                            for n, r in rows.items()) + f"; frontier {report['frontier'][h]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
