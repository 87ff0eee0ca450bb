"""Evaluation phase of benchmarks/personalization_v2.py: every variant on the same held-out users.

Test users (>= 100, one query each) express their traits only through held-out phrasing families; the 48
hand-written users are not generated at all. Per variant: likelihood preference (strategy, register) and greedy
generation (trait metric, ROUGE-L, spaced punctuation), 95% user-bootstrap intervals and paired differences
(flythinker.evaluation).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from benchmarks.personalization_v2 import BASE, log, recipe_of

PREF = ("strategy", "register")
GEN = ("strategy", "length", "register")
CONTEXT = {"a": "query", "b": "full", "c": "split", "c_lambda0": "split", "shipped_v1": "split",
           "shipped_v1_lambda0": "split"}
SHIPPED_V1 = "smollm2-135m-persona-empathy"


def load_variant(name: str, args):
    """(model, budget): a / c as the recipe's pair with the run's tensors; b a LoRA'd SmolLM2; shipped_v1."""
    from safetensors.torch import load_file

    run = Path(args.run_dir)
    recipe = recipe_of(args)
    if name == "shipped_v1":
        from flythinker.modeling import FlyThinkerForCausalLM
        from flythinker.pretrained import pair_info

        return FlyThinkerForCausalLM.from_pretrained(SHIPPED_V1).eval(), pair_info(SHIPPED_V1)["max_reasoner_tokens"]
    if name == "b":
        from peft import LoraConfig, get_peft_model

        from flythinker.hub import load_pretrained

        gen, _ = load_pretrained(BASE)
        model = get_peft_model(gen, LoraConfig(r=recipe.lora_rank, lora_alpha=2 * recipe.lora_rank,
                                               target_modules=list(recipe.lora_targets)))
        model.load_state_dict(load_file(run / "b.safetensors"), strict=False)
        return model.merge_and_unload().eval(), recipe.max_reasoner_tokens
    from flythinker.training.recipe import build_pair

    model = build_pair(BASE, BASE, recipe)
    missing, unexpected = model.load_state_dict(load_file(run / f"{name[:1]}.safetensors"), strict=False)
    if unexpected:
        raise ValueError(f"{name}: unexpected keys {unexpected[:3]}")
    if (run / f"{name[:1]}_fusion.safetensors").exists():
        model.load_fusion_state_dict(load_file(run / f"{name[:1]}_fusion.safetensors"))
    return model.eval(), recipe.max_reasoner_tokens


def preference_rows(model, tok, records, context: str, budget: int) -> list[dict]:
    from flythinker.persona.preference import preference

    if context == "query" and hasattr(model, "generator"):
        model = model.generator
    rows = []
    for r in records:  # one trait set per record (hand-written users carry one trait each)
        ts = [t for t in PREF if t in r.persona.traits]
        got = preference(model, tok, [r], ts, max_reasoner_tokens=budget,
                         view="full" if context == "full" else "query")[0]
        rows.append({"user": r.user_id, "record": r.record_id, **{t: float(v) for t, v in got.items()}})
    return rows


def generation_rows(model, tok, records, context: str, budget: int, args) -> tuple[list[dict], float]:
    from flythinker.evaluation.scoring import generate_replies, rouge_l, spaced_punctuation, trait_hits

    t = time.time()
    texts = generate_replies(model, tok, records, context=context, max_new_tokens=args.max_new_tokens,
                             max_reasoner_tokens=budget, batch_size=10)
    rows = [{"user": r.user_id, "record": r.record_id, "reply": x, "rouge_l": rouge_l(x, r.response),
             "spaced_punctuation": float(spaced_punctuation(x)), **trait_hits(x, r)}
            for r, x in zip(records, texts, strict=True)]
    return rows, time.time() - t


def summarise(rows, keys, base=None) -> dict:
    from flythinker.evaluation import paired, user_bootstrap
    from flythinker.evaluation.report import per_user

    out = {}
    for k in keys:
        mine = per_user(rows, k)
        if not mine:
            continue
        out[k] = user_bootstrap(list(mine.values()))
        if base is not None:
            out[f"{k}_minus"] = paired(mine, per_user(base, k))
    return out


def _score(name, model, budget, tok, sets, args, result):
    from flythinker.evaluation import fusion_lambda

    slot = result["variants"].setdefault(name, {})
    ctx = CONTEXT[name]
    for set_name, recs in sets.items():
        t = time.time()
        if name.endswith("_lambda0"):
            with fusion_lambda(model, 0.0):
                pref = preference_rows(model, tok, recs, ctx, budget)
        else:
            pref = preference_rows(model, tok, recs, ctx, budget)
        slot[f"{set_name}_preference_rows"] = pref
        slot[f"{set_name}_preference"] = summarise(pref, PREF)
        slot[f"{set_name}_preference_seconds"] = time.time() - t
        log(f"{name} {set_name} preference {_means(slot[f'{set_name}_preference'])}")
    if name.endswith("_lambda0") or args.skip_generation:
        return
    if hasattr(model, "reasoner"):
        from flythinker.training import merge_lora

        merge_lora(model)
    for set_name, recs in sets.items():
        gen, secs = generation_rows(model, tok, recs, ctx, budget, args)
        slot[f"{set_name}_generation_rows"] = gen
        slot[f"{set_name}_generation"] = summarise(gen, GEN + ("rouge_l", "spaced_punctuation"))
        slot[f"{set_name}_generation_seconds"] = secs
        log(f"{name} {set_name} generation {_means(slot[f'{set_name}_generation'])} in {secs:.0f} s")


def _means(s: dict) -> dict:
    return {k: round(v["mean"], 3) for k, v in s.items() if not k.endswith("_minus")}


def compare(result: dict) -> None:
    """Paired differences c - x for x in a, b, c_lambda0, shipped_v1 on each set."""
    v = result["variants"]
    diffs = {}
    pairs = [("c", o) for o in ("a", "b", "c_lambda0", "shipped_v1")] + [("shipped_v1", "shipped_v1_lambda0")]
    for mine, other in pairs:
        if mine not in v or other not in v:
            continue
        for key, traits in (("preference", PREF), ("generation", GEN + ("rouge_l",))):
            for set_name in ("heldout", "handwritten"):
                rows_c, rows_o = (v[x].get(f"{set_name}_{key}_rows") for x in (mine, other))
                if rows_c and rows_o:
                    s = summarise(rows_c, traits, rows_o)
                    diffs[f"{mine}-{other}/{set_name}/{key}"] = {k: x for k, x in s.items() if k.endswith("_minus")}
    result["differences"] = diffs


def evaluate_all(args) -> None:
    from flythinker.hub import atomic_write_json, load_tokenizer
    from flythinker.persona import load_dataset, load_handwritten_users
    from flythinker.training.recipe import select_per_user

    out = Path(args.out)
    tok = load_tokenizer(BASE)
    heldout = select_per_user(load_dataset("persona-empathy", "test", version=2), 1, args.test_users)
    sets = {"heldout": heldout, "handwritten": load_handwritten_users()}
    result = {"args": vars(args), "loadavg_start": os.getloadavg(), "torch": torch.__version__, "variants": {},
              "data": {"heldout_users": len(heldout), "handwritten_users": len(sets["handwritten"])}}
    if out.exists():  # a later run (e.g. --variants b) keeps the variants an earlier one scored on the same data
        old = json.loads(out.read_text())
        if old.get("data") == result["data"]:
            result["variants"].update(old.get("variants", {}))
    for p in ("train.json", "train_b.json"):
        f = Path(args.run_dir) / p
        if f.exists():
            result[p.removesuffix(".json")] = json.loads(f.read_text())
    t0 = time.time()
    for name in args.variants.split(","):
        model, budget = load_variant(name, args)
        if name in ("c", "shipped_v1"):
            _score(f"{name}_lambda0", model, budget, tok, sets, args, result)
        _score(name, model, budget, tok, sets, args, result)
        compare(result)
        result["wall_s"], result["loadavg_now"] = time.time() - t0, os.getloadavg()
        atomic_write_json(out, result)
        del model
    plot(result, out.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    """Greedy trait accuracy per variant (held-out families) with 95% CIs; training curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    order = ("a", "b", "c", "c_lambda0", "shipped_v1", "shipped_v1_lambda0")
    # greedy replies' traits where they were generated; else (--skip-generation) the likelihood preference
    metric, traits, what = "heldout_generation", GEN, "greedy replies"
    if not any(metric in result["variants"].get(n, {}) for n in order):
        metric, traits, what = "heldout_preference", PREF, "likelihood preference"
    names = [n for n in order if metric in result["variants"].get(n, {})]
    w = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        s = result["variants"][n][metric]
        m = [s[k]["mean"] for k in traits]
        err = [[mu - s[k]["ci95"][0] for mu, k in zip(m, traits)],
               [s[k]["ci95"][1] - mu for mu, k in zip(m, traits)]]
        ax.bar([j + i * w for j in range(len(traits))], m, w, yerr=err, capsize=3, label=n)
    ax.axhline(0.5, color="grey", ls="--", lw=0.8)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(traits))], traits)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"{what}, {result['data']['heldout_users']} users of held-out families (95% CI)")
    if names:
        ax.legend(fontsize=8)
    for key, label in (("train", "a"), ("train", "c"), ("train_b", None)):
        entry = result.get(key, {})
        curve = (entry.get(label, {}) if label else entry).get("curve")
        if curve:
            ax2.plot([p["step"] for p in curve], [p["strategy"] for p in curve], marker="o",
                     label=f"{label or 'b'} strategy")
            ax2.plot([p["step"] for p in curve], [p["register"] for p in curve], marker="x", ls=":",
                     label=f"{label or 'b'} register")
    ax2.axhline(0.5, color="grey", ls="--", lw=0.8)
    ax2.set_xlabel("training step (c: stage-2 step)")
    ax2.set_ylabel("likelihood preference, validation users")
    ax2.legend(fontsize=8)
    fig.suptitle("persona-empathy v2, SmolLM2-135M-Instruct: generator LoRA alone (a), history in prompt (b), "
                 "flythinker recipe (c)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
