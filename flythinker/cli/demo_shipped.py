"""`flythinker demo` on the shipped personalised pair `smollm2-135m-persona-empathy` (no training on the way).

1. Load the pair by name (built once from the offline SmolLM2 conversion + the trained deltas shipped in
   flythinker/pretrained: the generator's LoRA factors, merged at load, and the fusion; ~1 min the first time,
   seconds later).
2. For a few held-out test users, answer one query three ways, streamed, with tokens/s and the rule-based metric:
   the generator as shipped (SmolLM2), the pair's fine-tuned generator without the reasoner (lambda 0: the same
   weights, no latents), and flythinker (the reasoner reads the user's history).
3. The likelihood-preference table over `--table-users` held-out users, computed live: how often each model
   prefers the reply the user wants over the same reply with the strategy (resp. register) flipped.
`--retrain` reruns the pair's recipe (flythinker.training.recipe, data as pair.json says) into the cache and uses
what it writes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SHIPPED = "smollm2-135m-persona-empathy"


def _retrained_folder(info: dict) -> Path:
    """Rerun the pair's recipe (flythinker.training.recipe.retrain_shipped: the named recipe on the bundled data
    pair.json names) into the cache; returns the folder holding the retrained pair.json + deltas."""
    from flythinker.hub import cache_dir
    from flythinker.training.recipe import retrain_shipped

    dest = cache_dir() / "demo" / f"{SHIPPED}-retrained"
    print(f"retraining the pair into {dest} (flythinker.training.recipe, {info.get('recipe_spec', 'persona-pair')})",
          flush=True)
    return retrain_shipped(info, dest)


def _table(model, base, tok, records, budget: int, out) -> dict:
    from flythinker.persona.preference import accuracy, preference

    traits = ("strategy", "register")
    start = time.perf_counter()
    lam = model.config.fusion_lambda
    rows = {"generator as shipped": accuracy(preference(base, tok, records, traits)),
            "fine-tuned, no latents (lambda 0)": accuracy(preference(model.generator, tok, records, traits)),
            f"flythinker (lambda {lam:g})": accuracy(preference(model, tok, records, traits,
                                                                max_reasoner_tokens=budget))}
    seconds = time.perf_counter() - start
    n = len(records)
    print(f"\n=== likelihood preference over {n} held-out users (computed live in {seconds:.0f} s) ===", file=out)
    print(f"{'':36s} {'strategy':>9s} {'register':>9s}", file=out)
    for label, acc in rows.items():
        print(f"{label:36s} {acc['strategy']:9.0%} {acc['register']:9.0%}", file=out)
    print("(share of users whose own reply the model finds likelier than the same reply with that trait flipped, "
          "by the NLL of its opening; a model blind to the user scores ~50%)", file=out, flush=True)
    return {"rows": rows, "seconds": seconds, "users": n}


def run_shipped(args: argparse.Namespace, compare, pick_test_users) -> int:
    """The shipped-pair demo (`compare` / `pick_test_users`: flythinker.cli.demo's, passed in so that the two
    modules do not import each other); returns the exit status."""
    import torch

    from flythinker.hub import cache_dir, load_pretrained, load_tokenizer
    from flythinker.pretrained import pair_info
    from flythinker.pretrained.loading import from_shipped

    wall = time.perf_counter()
    out = sys.stdout
    if args.seed is not None:
        torch.manual_seed(args.seed)
    info = pair_info(SHIPPED)
    print(f"flythinker demo: the shipped pair {SHIPPED} ({info['base']} as generator and reasoner, trained: "
          f"{info['trained']}), {torch.get_num_threads()} CPU threads", flush=True)
    folder = _retrained_folder(info) if args.retrain else None
    model = from_shipped(SHIPPED, folder=folder)  # folder None: the packaged pair
    tok = load_tokenizer(SHIPPED)
    base, _ = load_pretrained(info["base"])  # the generator as shipped
    base.eval()
    print(f"pair loaded in {time.perf_counter() - wall:.0f} s; the generator reads only the query, the reasoner "
          f"the user's history + query ({info['max_reasoner_tokens']} tokens at most)", flush=True)
    from flythinker.cli.common import generation_kwargs
    from flythinker.parallel_auto import decide

    # parallel="auto" measures on first use (then cached while fresh): do it before anything is timed, so that a fresh
    # machine's first reply does not carry the measurement
    start = time.perf_counter()
    decision = decide(model)
    print(f"parallel decode: {decision.mode} ({decision.reason}; decided in {time.perf_counter() - start:.1f} s)",
          flush=True)

    budget = info["max_reasoner_tokens"]
    records = pick_test_users(args.users + args.table_users, cache_dir() / "data")
    shown = compare(base, model, tok, records[: args.users], generation_kwargs(args), budget, out=out,
                    ablation=True)
    table = _table(model, base, tok, records[args.users:], budget, out)
    print(f"done in {time.perf_counter() - wall:.0f} s", flush=True)
    return 0 if shown and table else 1
