"""`flythinker demo` on the shipped personalised pair `smollm2-135m-persona-empathy` (no training on the way).

1. Load the pair by name (built once from the offline SmolLM2 conversion + the trained fusion shipped in
   flythinker/pretrained; ~1 min the first time, seconds later).
2. For a few held-out test users, answer one query with the generator as shipped and with flythinker, streamed,
   tokens/s and the rule-based strategy metric of each. In this pair only the fusion was trained, so the
   "fine-tuned generator without the reasoner" *is* the generator as shipped: one column covers both.
3. The likelihood-preference table over `--table-users` held-out users, computed live: how often each model
   prefers the reply the user wants over the same reply with the strategy (resp. register) flipped.
`--retrain` reruns the pair's recipe (pair.json) from a checkout and uses the weights it writes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

SHIPPED = "smollm2-135m-persona-empathy"


def _retrained_deltas(info: dict) -> Path:
    """Run the recipe command of pair.json (needs a source checkout: the recipe lives in benchmarks/)."""
    from flythinker.hub import cache_dir

    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "personalization_fusion.py").is_file():
        raise SystemExit("flythinker demo --retrain: the recipe (benchmarks/personalization_fusion.py) is only in a "
                         "source checkout of flythinker")
    dest = cache_dir() / "demo" / f"{SHIPPED}-retrained.safetensors"
    cmd = info["recipe"].split()
    cmd[cmd.index("--save") + 1] = str(dest)
    cmd[0] = sys.executable
    cmd += ["--out", str(cache_dir() / "demo" / f"{SHIPPED}-retrained.json")]
    print("retraining the fusion: " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=root, check=True)
    return dest


def _table(model, tok, records, budget: int, out) -> dict:
    from flythinker.persona.preference import accuracy, preference

    traits = ("strategy", "register")
    start = time.perf_counter()
    lam = model.config.fusion_lambda
    ours = accuracy(preference(model, tok, records, traits, max_reasoner_tokens=budget))
    alone = accuracy(preference(model.generator, tok, records, traits, max_reasoner_tokens=budget))
    seconds = time.perf_counter() - start
    n = len(records)
    print(f"\n=== likelihood preference over {n} held-out users (computed live in {seconds:.0f} s) ===", file=out)
    print(f"{'':34s} {'strategy':>9s} {'register':>9s}", file=out)
    print(f"{'generator alone (= lambda 0)':34s} {alone['strategy']:9.0%} {alone['register']:9.0%}", file=out)
    print(f"{f'flythinker (lambda {lam:g})':34s} {ours['strategy']:9.0%} {ours['register']:9.0%}", file=out)
    print("(share of users whose own reply the model finds likelier than the same reply with that trait flipped, "
          "by the NLL of its opening; a model blind to the user scores ~50%)", file=out, flush=True)
    return {"flythinker": ours, "generator": alone, "seconds": seconds, "users": n}


def run_shipped(args: argparse.Namespace, compare, pick_test_users) -> int:
    """The shipped-pair demo (`compare` / `pick_test_users`: flythinker.cli.demo's, passed in so that the two
    modules do not import each other); returns the exit status."""
    import torch

    from flythinker.hub import cache_dir
    from flythinker.modeling import FlyThinkerForCausalLM
    from flythinker.models import load_tokenizer
    from flythinker.pretrained import pair_info

    wall = time.perf_counter()
    out = sys.stdout
    if args.seed is not None:
        torch.manual_seed(args.seed)
    info = pair_info(SHIPPED)
    print(f"flythinker demo: the shipped pair {SHIPPED} ({info['base']} as generator and reasoner, trained: "
          f"{info['trained']}), {torch.get_num_threads()} CPU threads", flush=True)
    model = FlyThinkerForCausalLM.from_pretrained(SHIPPED).eval()
    tok = load_tokenizer(SHIPPED)
    if args.retrain:
        from safetensors.torch import load_file

        with torch.no_grad():
            model.latent_proj.weight.copy_(load_file(_retrained_deltas(info))["latent_proj.weight"])
    print(f"pair loaded in {time.perf_counter() - wall:.0f} s; the generator reads only the query, the reasoner "
          f"the user's history + query ({info['max_reasoner_tokens']} tokens at most)", flush=True)
    from flythinker.cli.common import generation_kwargs

    budget = info["max_reasoner_tokens"]
    records = pick_test_users(args.users + args.table_users, cache_dir() / "data")
    shown = compare(model.generator, model, tok, records[: args.users], generation_kwargs(args), budget, out=out)
    table = _table(model, tok, records[args.users:], budget, out)
    print(f"done in {time.perf_counter() - wall:.0f} s", flush=True)
    return 0 if shown and table else 1
