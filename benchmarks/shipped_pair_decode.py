"""Decode speed of the shipped pair at the demo's setting (target: flythinker's tokens/s >= 0.8x the generator
alone's in the same run).

    .venv/bin/python -m benchmarks.shipped_pair_decode [--users 6] [--rounds 2] [--fixed-tokens 64]

The shipped `smollm2-135m-persona-empathy` pair (what `make demo` loads) answers held-out persona-empathy test users
(the demo's users: the first of the test split), one query each, batch 1, greedy, fp32 on the CPU, through the demo's
own call (`flythinker.cli.common.generate_text`: `generate()`, which takes the pair's fast static-cache loop).
Variants, interleaved (the order rotates per user) over `--rounds` rounds:

  generator as shipped     SmolLM2-135M-Instruct, HF generate, reads the query (the demo's "generator alone")
  fine-tuned, lambda 0     the pair's generator (LoRA merged) without latents, HF generate, reads the query
  flythinker               the shipped pair as `from_pretrained` loads it (and the demo runs it): one shared base,
                           each decode step one forward of the generator's and the reasoner's rows; the reasoner
                           reads history + query (up to 160 tokens), the generator the query
  flythinker, two copies   the same weights as two independent models (`shared_base=False`, the LoRA merged), the
                           reasoner's step on its own core beside the generator's
  flythinker, k-layer rsn  speed only: the two-copy generator with a reasoner of SmolLM2's first `--reasoner-layers`
                           layers (flythinker.truncate; its untrained zero projection gives the generator's tokens,
                           the cost is what a trained k-layer reasoner would cost)

Modes: `demo` = up to 80 new tokens, stopping at eos (each model writes its own reply, as in the demo: the end-to-end
rate of a short reply carries more of the prefill); `fixed` = exactly `--fixed-tokens` new tokens, eos off (the same
work for every variant). Per variant and mode: end-to-end tokens/s (new tokens over the whole calls), median time to
the first token, decode tokens/s after it; the ratios of flythinker's rates to the generator as shipped's. The load
average is recorded around every call. Results: benchmarks/results/shipped_pair_decode.json + .png.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks._common import RESULTS, write_json  # noqa: E402

# `flythinker bench` contract (flythinker/cli/bench.py): the quick mode's arguments and its time on 2 idle CPU cores
QUICK = {"args": ["--users", "1", "--rounds", "1", "--max-new-tokens", "16", "--fixed-tokens", "16",
                   "--out", "{results}/shipped_pair_decode"], "seconds": 90}

SHIPPED = "smollm2-135m-persona-empathy"
BASELINE = "generator as shipped"
TARGET = 0.8  # flythinker's tokens/s over the generator alone's


@contextlib.contextmanager
def eos_off(model):
    """Every call on `model` makes all its max_new_tokens (generation_config.eos_token_id = None for the block)."""
    gc = model.generation_config
    old = gc.eos_token_id
    gc.eos_token_id = None
    try:
        yield
    finally:
        gc.eos_token_id = old


def load(reasoner_layers: int):
    """{variant: model}, the tokenizer and the reasoner's token budget."""
    from flythinker import FlyThinkerForCausalLM
    from flythinker.hub import load_pretrained, load_tokenizer
    from flythinker.pretrained import pair_info
    from flythinker.truncate import truncated_reasoner

    info = pair_info(SHIPPED)
    pair = FlyThinkerForCausalLM.from_pretrained(SHIPPED).eval()  # one shared base, batched decode steps
    two = FlyThinkerForCausalLM.from_pretrained(SHIPPED, shared_base=False).eval()  # two copies, LoRA merged
    base, _ = load_pretrained(info["base"])
    short = FlyThinkerForCausalLM.from_pair(two.generator, truncated_reasoner(two.reasoner, reasoner_layers),
                                            **info["fusion"]).eval()
    models = {BASELINE: base.eval(), "fine-tuned, lambda 0 (merged)": two.generator, "flythinker": pair,
              "flythinker, two copies": two,
              f"flythinker, {reasoner_layers}-layer reasoner (speed only)": short}
    return models, load_tokenizer(SHIPPED), info["max_reasoner_tokens"]


def prompts_for(users: int, tok, budget: int) -> list:
    """The split-context prompts of the demo's test users (`flythinker.cli.demo.pick_test_users`)."""
    from flythinker.cli.common import Prompts
    from flythinker.cli.demo import pick_test_users
    from flythinker.hub import cache_dir
    from flythinker.persona import build_views

    out = []
    for r in pick_test_users(users, cache_dir() / "data"):
        v = build_views(r, tok, mode="split", max_reasoner_tokens=budget, warn=False)
        out.append(Prompts(torch.tensor([v.generator_prompt_ids]), torch.tensor([v.reasoner_prompt_ids])))
    return out


def one_call(model, prompts, tok, max_new: int, fixed: bool) -> dict:
    """One greedy reply through the demo's call: new tokens, seconds, first-token seconds, loads around it."""
    from flythinker.cli.common import generate_text

    load0 = os.getloadavg()[0]
    with eos_off(model) if fixed else contextlib.nullcontext():
        reply = generate_text(model, prompts, tok, {"max_new_tokens": max_new, "do_sample": False}, stream=False,
                              out=io.StringIO())
    if fixed and reply.tokens != max_new:
        raise RuntimeError(f"expected {max_new} new tokens with eos off, got {reply.tokens}")
    return {"tokens": reply.tokens, "seconds": reply.seconds, "first_token_s": reply.first_token_s,
            "load": [load0, os.getloadavg()[0]]}


def summarise(calls: list[dict]) -> dict:
    tokens = sum(c["tokens"] for c in calls)
    seconds = sum(c["seconds"] for c in calls)
    decode_tokens = sum(c["tokens"] - 1 for c in calls)
    decode_s = sum(c["seconds"] - c["first_token_s"] for c in calls)
    return {"calls": len(calls), "new_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "first_token_s_median": statistics.median(c["first_token_s"] for c in calls),
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else None,
            "mean_new_tokens": tokens / len(calls),
            "load_max": max(x for c in calls for x in c["load"])}


def run_mode(models: dict, prompts: list, tok, rounds: int, max_new: int, fixed: bool, tag: str) -> dict:
    names = list(models)
    calls: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for u, p in enumerate(prompts):
            k = (u + r) % len(names)
            for name in names[k:] + names[:k]:  # the order rotates: no variant always runs first
                c = one_call(models[name], p, tok, max_new, fixed)
                calls[name].append(c)
                print(f"  [{tag} r{r} u{u}] {name:44s} {c['tokens']:3d} tok {c['seconds']:6.2f} s  first "
                      f"{c['first_token_s']:.2f} s  load {c['load'][0]:.1f}", flush=True)
    rows = {n: summarise(cs) for n, cs in calls.items()}
    base = rows[BASELINE]
    for row in rows.values():
        row["tokens_per_s_ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["decode_tokens_per_s_ratio"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        row["first_token_ratio"] = row["first_token_s_median"] / base["first_token_s_median"]
    return rows


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report["modes"])
    names = list(report["modes"][modes[0]])
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.2))
    width = 0.8 / len(names)
    for ax, mode in zip(axes, modes, strict=True):
        rows = report["modes"][mode]
        for i, name in enumerate(names):
            vals = [rows[name]["tokens_per_s"], rows[name]["decode_tokens_per_s"]]
            xs = [x + (i - (len(names) - 1) / 2) * width for x in range(2)]
            ax.bar(xs, vals, width, label=name)
            for x, v, key in zip(xs, vals, ("tokens_per_s_ratio", "decode_tokens_per_s_ratio"), strict=True):
                ax.text(x, v, f"{rows[name][key]:.2f}x", ha="center", va="bottom", fontsize=7)
        ax.axhline(TARGET * rows[BASELINE]["tokens_per_s"], color="grey", ls=":", lw=1)
        ax.set_xticks([0, 1], ["end to end", "after the first token"])
        ax.set_ylabel("new tokens / s")
        ax.set_title(f"{mode}: mean {rows['flythinker']['mean_new_tokens']:.0f} new tokens (flythinker)", fontsize=9)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"shipped pair, batch 1, CPU ({report['threads']} threads): ratio to the generator as shipped; "
                 f"dotted: {TARGET}x its end-to-end rate", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=80, help="demo mode's cap (the demo's default)")
    ap.add_argument("--fixed-tokens", type=int, default=64)
    ap.add_argument("--reasoner-layers", type=int, default=8)
    ap.add_argument("--out", default=str(RESULTS / "shipped_pair_decode"))
    args = ap.parse_args(argv)
    start = time.perf_counter()
    models, tok, budget = load(args.reasoner_layers)
    prompts = prompts_for(args.users, tok, budget)
    for m in models.values():  # warm-up: first-call allocations, the reasoner worker thread
        one_call(m, prompts[0], tok, 4, fixed=True)
    report = {"pair": SHIPPED, "threads": torch.get_num_threads(), "cores": os.cpu_count(), "users": len(prompts),
              "rounds": args.rounds, "target": TARGET, "load_start": os.getloadavg()[0],
              "generator_prompt_tokens": statistics.mean(p.generator.shape[1] for p in prompts),
              "reasoner_prompt_tokens": statistics.mean(p.reasoner.shape[1] for p in prompts),
              "modes": {"demo": run_mode(models, prompts, tok, args.rounds, args.max_new_tokens, False, "demo"),
                        "fixed": run_mode(models, prompts, tok, args.rounds, args.fixed_tokens, True, "fixed")}}
    fly = {m: rows["flythinker"] for m, rows in report["modes"].items()}
    report["target_met"] = {m: {"end_to_end": r["tokens_per_s_ratio"] >= TARGET,
                                "after_first_token": r["decode_tokens_per_s_ratio"] >= TARGET}
                            for m, r in fly.items()}
    report["load_end"] = os.getloadavg()[0]
    report["wall_seconds"] = time.perf_counter() - start
    out = Path(args.out)
    write_json(out.with_suffix(".json"), report)
    plot(report, out.with_suffix(".png"))
    for mode, rows in report["modes"].items():
        print(f"\n{mode}: {'':40s} {'tok/s':>7s} {'first':>7s} {'decode':>7s}   ratios e2e / decode / first")
        for name, r in rows.items():
            print(f"  {name:46s} {r['tokens_per_s']:7.1f} {r['first_token_s_median']:6.2f}s "
                  f"{r['decode_tokens_per_s']:7.1f}   {r['tokens_per_s_ratio']:.2f}x / "
                  f"{r['decode_tokens_per_s_ratio']:.2f}x / {r['first_token_ratio']:.2f}x")
    print(f"\ntarget {TARGET}x: {report['target_met']}; wall {report['wall_seconds']:.0f} s; "
          f"wrote {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
