"""Returning users: first-token latency and end-to-end rate of a pair with the reasoner prefix cache, against the
generator alone reading the query, all in one run.

    .venv/bin/python -m benchmarks.returning_users [--users 4] [--turns 3] [--reasoner-layers 8]

Each user (the demo's held-out persona-empathy test users) comes back `--turns` times. Turn 1's reasoner view is
the demo's (history + query, up to the pair's reasoner budget); turn t + 1's is turn t's view, the pair's own reply
(which the reasoner read while it was being generated), and a new user message (the next test user's query,
chat-templated); the generator reads only the new query (split context). Batch 1, greedy, up to `--max-new-tokens`
new tokens stopping at eos (the demo's replies), fp32 on the CPU, through `generate()` (the lean loop), with a
streamer noting the first token. Variants, interleaved (the order rotates per call):

  generator as shipped       SmolLM2-135M-Instruct reading the query (the baseline)
  flythinker                 the shipped pair as `from_pretrained` loads it (one shared base), no prefix cache
  flythinker, prefix cache   the same pair with `enable_reasoner_prefix_cache()`
  <k>-layer rsn, prefix cache   speed only: the shipped pair's generator (two copies, LoRA merged) with a reasoner
                             of its first k layers (flythinker.truncate; a trained k-layer reasoner costs the same)

`--threads` torch threads (default 1: on a shared, oversubscribed machine two OpenMP threads per model are
catastrophic, see flythinker.workers; the ratios compare variants at the same setting).

Checked in the run: the shipped pair's replies with and without the cache are the same tokens. Reported per variant
over turns 2.. (returning users) and turn 1 apart: median first-token seconds, end-to-end new tokens/s, their ratios
to the baseline; the targets; the prefix cache's counters; the `parallel="auto"` decisions; the load average around
every call. Results: benchmarks/results/returning_users.json + .png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks._common import RESULTS, write_json  # noqa: E402

# `flythinker bench` contract (flythinker/cli/bench.py): no quick mode, and why
QUICK = {"skip": "not sized for the quick set yet (loads the real SmolLM2 pair, several turns per user)"}

SHIPPED = "smollm2-135m-persona-empathy"
BASELINE = "generator as shipped"
SAME, SAME_CACHED = "flythinker", "flythinker, prefix cache"
TARGETS = {"first_token_same_size": 1.8, "first_token_k_layers": 1.3, "end_to_end": 0.75}


def load(k: int) -> tuple[dict, dict, object, int]:
    """({variant: model}, {variant: prefix cache or None}, tokenizer, reasoner budget)."""
    from flythinker import FlyThinkerForCausalLM
    from flythinker.hub import load_pretrained, load_tokenizer
    from flythinker.pretrained import pair_info
    from flythinker.reasoner_prefix_cache import ReasonerPrefixCache
    from flythinker.truncate import truncated_reasoner

    info = pair_info(SHIPPED)
    pair = FlyThinkerForCausalLM.from_pretrained(SHIPPED).eval()
    two = FlyThinkerForCausalLM.from_pretrained(SHIPPED, shared_base=False).eval()
    short = FlyThinkerForCausalLM.from_pair(two.generator, truncated_reasoner(two.reasoner, k), **info["fusion"]).eval()
    del two
    base, _ = load_pretrained(info["base"])
    models = {BASELINE: base.eval(), SAME: pair, SAME_CACHED: pair, f"{k}-layer rsn, prefix cache": short}
    caches = {name: (ReasonerPrefixCache() if name.endswith("prefix cache") else None) for name in models}
    return models, caches, load_tokenizer(SHIPPED), info["max_reasoner_tokens"]


def users_for(n: int, tok, budget: int) -> list[dict]:
    """Per user: the first turn's views and the later turns' (generator view, reasoner message tokens)."""
    from benchmarks.shipped_pair_decode import prompts_for

    prompts = prompts_for(2 * n, tok, budget)
    out = []
    for u in range(n):
        later = []
        for j in range(1, 3):  # the next test users' queries as this user's later messages
            g = prompts[(u + j) % len(prompts)].generator
            text = tok.decode(g[0])
            tail = text[text.rindex("<|im_start|>user\n"):]
            later.append((g, torch.tensor([tok(tail, add_special_tokens=False)["input_ids"]])))
        out.append({"generator": prompts[u].generator, "reasoner": prompts[u].reasoner, "later": later})
    return out


def one_call(model, cache, gen_ids, rsn_ids, tok, max_new: int) -> dict:
    """One greedy reply: new token ids, seconds, first-token seconds, loads around it."""
    from flythinker.cli.common import _TimingStreamer
    from flythinker.modeling import FlyThinkerForCausalLM

    kw = {"attention_mask": torch.ones_like(gen_ids), "max_new_tokens": max_new, "do_sample": False,
          "pad_token_id": tok.pad_token_id}
    if isinstance(model, FlyThinkerForCausalLM):
        model.reasoner_prefix_cache = cache
        kw.update(reasoner_input_ids=rsn_ids, reasoner_attention_mask=torch.ones_like(rsn_ids))
    load0 = os.getloadavg()[0]
    start = time.perf_counter()
    kw["streamer"] = streamer = _TimingStreamer(None, start)
    with torch.inference_mode():
        seq = model.generate(gen_ids, **kw)
    seconds = time.perf_counter() - start
    new = seq[0, gen_ids.shape[1]:]
    return {"ids": new, "tokens": int(new.numel()), "seconds": seconds, "first_token_s": streamer.first,
            "reasoner_tokens": None if rsn_ids is None else int(rsn_ids.shape[1]),
            "load": [load0, os.getloadavg()[0]]}


def next_view(view: torch.Tensor, reply: torch.Tensor, message: torch.Tensor, tok) -> torch.Tensor:
    """The reasoner view of the next turn: this one, the reply (closed with eos if it was cut), the new message."""
    parts = [view, reply[None]]
    if reply.numel() == 0 or int(reply[-1]) != tok.eos_token_id:
        parts.append(torch.tensor([[tok.eos_token_id]]))
    parts.append(torch.tensor([tok("\n", add_special_tokens=False)["input_ids"]]))
    return torch.cat(parts + [message], dim=1)


def run(models: dict, caches: dict, users: list[dict], tok, turns: int, max_new: int) -> dict[str, list[dict]]:
    names = list(models)
    calls: dict[str, list[dict]] = {n: [] for n in names}
    for u, user in enumerate(users):
        views = dict.fromkeys(names, user["reasoner"])
        gen = user["generator"]
        for t in range(turns):
            k = (u * turns + t) % len(names)
            for name in names[k:] + names[:k]:
                model = models[name]
                c = one_call(model, caches[name], gen, None if name == BASELINE else views[name], tok, max_new)
                c.update(user=u, turn=t + 1)
                calls[name].append(c)
                print(f"  [u{u} t{t + 1}] {name:32s} rsn {c['reasoner_tokens'] or 0:4d} tok  {c['tokens']:3d} new "
                      f"{c['seconds']:6.2f} s  first {c['first_token_s']:.3f} s  load {c['load'][0]:.1f}", flush=True)
            same = calls[SAME][-1]["ids"], calls[SAME_CACHED][-1]["ids"]
            if not torch.equal(*same):
                raise RuntimeError(f"user {u} turn {t + 1}: the prefix cache changed the shipped pair's reply")
            if t + 1 < turns:
                gen, message = user["later"][t]
                for name in names[1:]:
                    views[name] = next_view(views[name], calls[name][-1]["ids"], message, tok)
    return calls


def summarise(calls: list[dict]) -> dict:
    tokens = sum(c["tokens"] for c in calls)
    seconds = sum(c["seconds"] for c in calls)
    return {"calls": len(calls), "new_tokens": tokens, "tokens_per_s": tokens / seconds,
            "first_token_s_median": statistics.median(c["first_token_s"] for c in calls),
            "first_token_s": [round(c["first_token_s"], 4) for c in calls],
            "reasoner_tokens_mean": (statistics.mean(c["reasoner_tokens"] for c in calls)
                                     if calls[0]["reasoner_tokens"] is not None else None),
            "load_max": max(x for c in calls for x in c["load"])}


def table(calls: dict[str, list[dict]], returning: bool) -> dict[str, dict]:
    rows = {n: summarise([c for c in cs if (c["turn"] > 1) == returning]) for n, cs in calls.items()}
    base = rows[BASELINE]
    for row in rows.values():
        row["first_token_ratio"] = row["first_token_s_median"] / base["first_token_s_median"]
        row["tokens_per_s_ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
    return rows


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for ax, key, label in ((axes[0], "first_token_ratio", "first token / generator alone's (median)"),
                           (axes[1], "tokens_per_s_ratio", "end-to-end tokens/s / generator alone's")):
        names = list(report["returning"])
        width = 0.38
        for i, (part, title) in enumerate((("first_visit", "turn 1"), ("returning", "turns 2+"))):
            vals = [report[part][n][key] for n in names]
            xs = [x + (i - 0.5) * width for x in range(len(names))]
            ax.bar(xs, vals, width, label=title)
            for x, v in zip(xs, vals, strict=True):
                ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=15, fontsize=7, ha="right")
        ax.set_ylabel(label, fontsize=8)
        ax.axhline(1.0, color="grey", lw=0.8)
    for t in (TARGETS["first_token_same_size"], TARGETS["first_token_k_layers"]):
        axes[0].axhline(t, color="red", ls=":", lw=1)
    axes[1].axhline(TARGETS["end_to_end"], color="red", ls=":", lw=1)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"returning users, shipped pair, batch 1, CPU ({report['threads']} threads, load "
                 f"{report['load_start']:.1f}-{report['load_end']:.1f}); dotted red: targets", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--turns", type=int, default=3, choices=(2, 3))
    ap.add_argument("--max-new-tokens", type=int, default=80, help="the demo's cap")
    ap.add_argument("--reasoner-layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: %(default)s)")
    ap.add_argument("--out", default=str(RESULTS / "returning_users"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    models, caches, tok, budget = load(args.reasoner_layers)
    users = users_for(args.users, tok, budget)
    for name, m in models.items():  # warm-up: first-call allocations, the worker thread, parallel="auto"
        one_call(m, None, users[0]["generator"], None if name == BASELINE else users[0]["reasoner"], tok, 4)
    from flythinker.parallel_auto import cached_decisions

    report = {"pair": SHIPPED, "threads": torch.get_num_threads(), "cores": os.cpu_count(), "users": len(users),
              "turns": args.turns, "max_new_tokens": args.max_new_tokens, "reasoner_layers": args.reasoner_layers,
              "targets": TARGETS, "load_start": os.getloadavg()[0],
              "generator_prompt_tokens": statistics.mean(u["generator"].shape[1] for u in users)}
    calls = run(models, caches, users, tok, args.turns, args.max_new_tokens)
    report["first_visit"] = table(calls, returning=False)
    report["returning"] = table(calls, returning=True)
    k_cached = f"{args.reasoner_layers}-layer rsn, prefix cache"
    ret = report["returning"]
    report["target_met"] = {
        "first_token_same_size": ret[SAME_CACHED]["first_token_ratio"] <= TARGETS["first_token_same_size"],
        "first_token_k_layers": ret[k_cached]["first_token_ratio"] <= TARGETS["first_token_k_layers"],
        "end_to_end": ret[SAME_CACHED]["tokens_per_s_ratio"] >= TARGETS["end_to_end"]}
    report["prefix_cache"] = {n: vars(c.stats) | {"bytes": c.nbytes, "entries": len(c)}
                              for n, c in caches.items() if c is not None}
    report["parallel_auto"] = cached_decisions()
    report["load_end"] = os.getloadavg()[0]
    report["wall_seconds"] = time.perf_counter() - start
    out = Path(args.out)
    write_json(out.with_suffix(".json"), report)
    plot(report, out.with_suffix(".png"))
    for part in ("first_visit", "returning"):
        print(f"\n{part}: {'':26s} {'first':>7s} {'tok/s':>6s}   ratios first / e2e")
        for name, r in report[part].items():
            print(f"  {name:32s} {r['first_token_s_median']:6.3f}s {r['tokens_per_s']:6.1f}   "
                  f"{r['first_token_ratio']:.2f}x / {r['tokens_per_s_ratio']:.2f}x")
    print(f"\ntargets {TARGETS}: {report['target_met']}; wall {report['wall_seconds']:.0f} s; "
          f"wrote {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
