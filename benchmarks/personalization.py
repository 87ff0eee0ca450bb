"""Does the reasoner personalise? Tiny random-init models trained on ``persona-empathy`` (CPU, minutes).

    .venv/bin/python -m benchmarks.personalization --quick     # < 5 min on 2 CPU cores
    .venv/bin/python -m benchmarks.personalization             # more users, steps and test records

Variants, all trained from the same generator initialisation on the same batches, evaluated on held-out users:
  a_query_sft    generator alone, SFT on the short view (the query only): cannot know the user's traits
  b_history_sft  generator alone, SFT on the full view (history + query): the expensive upper reference
  c_split        FlyThinker split context: the reasoner reads history + query, the generator the query
  d_shared       FlyThinker shared context: both read history + query (the paper's setting)
  e_lambda0      c_split with fusion_lambda = 0: must match a_query_sft (the fusion is off)
Metrics per variant: strategy_accuracy (mean over the three hidden traits of the rule-based check; 0.5 is a
trait-blind model), exact (all three right), rouge_l and nll (per response token) against the reference,
generator_tokens / reasoner_tokens (mean prompt + reference-response tokens each model reads per example).
Greedy decoding. Results: benchmarks/results/personalization.{json,png}; os.getloadavg() recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from flythinker.configuration import IGNORE_INDEX
from flythinker.persona import build_views, make_persona_empathy, mean_rouge_l, strategy_accuracy
from flythinker.persona.wordlevel import word_tokenizer
from flythinker.training.collator import FlyThinkerCollator
from flythinker.training.loop import train_loop
from flythinker.training.toy import tiny_config

# `flythinker bench` contract (flythinker/cli/bench.py): no quick mode, and why
QUICK = {"skip": "a training benchmark: its own --quick preset alone takes ~5 min"}

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "a_query_sft": dict(pair=False, view="query"),
    "b_history_sft": dict(pair=False, view="full"),
    "c_split": dict(pair=True, mode="split", fusion_lambda=0.5),
    "d_shared": dict(pair=True, mode="shared", fusion_lambda=0.5),
    "e_lambda0": dict(pair=True, mode="split", fusion_lambda=0.0),
}
PRESETS = {  # quick: < 5 min on 2 busy cores for all five variants
    "quick": dict(n_users=400, steps=250, batch=16, n_test=128, gen_hidden=64, rsn_hidden=48, layers=2,
                  history_sessions=1),
    "full": dict(n_users=800, steps=1000, batch=32, n_test=600, gen_hidden=96, rsn_hidden=64, layers=3,
                 history_sessions=0),  # 0: the dataset default (2-3 past sessions)
}


def prepare(n_users: int, seed: int, history_sessions: int | None = None):
    """Records, a word-level tokenizer over the data, and per-split rows (each record with its split views)."""
    hist = {} if history_sessions is None else {"history_sessions": (history_sessions, history_sessions)}
    data = make_persona_empathy(n_users=n_users, seed=seed, **hist)
    texts = [t.text for recs in data.values() for r in recs for t in r.history]
    texts += [r.query.text for recs in data.values() for r in recs]
    texts += [r.response for recs in data.values() for r in recs]
    tok = word_tokenizer(texts)
    examples = {split: [dict(views=build_views(r, tok, mode="split", system_prompt=""), record=r) for r in recs]
                for split, recs in data.items()}
    return tok, examples


def context(spec: dict) -> str:
    """Which example of the split views a variant trains on (`Views.example`): a generator alone reads the query
    view ("generator") or the full view ("shared"); a pair reads both (split) or the full view (shared)."""
    if not spec["pair"]:
        return {"query": "generator", "full": "shared"}[spec["view"]]
    return spec["mode"]


def features(rows: list[dict], spec: dict) -> list[dict]:
    """Collator features of one variant: which prompt each model reads."""
    return [r["views"].example(context(spec)) for r in rows]


def build_model(spec: dict, vocab: int, args, fusion: dict):
    from transformers import AutoModelForCausalLM

    def llama(hidden: int, seed: int):
        torch.manual_seed(seed)
        cfg = tiny_config("llama", hidden_size=hidden, num_hidden_layers=args.layers, vocab_size=vocab,
                          num_attention_heads=4, num_key_value_heads=4, intermediate_size=2 * hidden)
        return AutoModelForCausalLM.from_config(cfg)

    gen = llama(args.gen_hidden, args.seed)  # the same generator initialisation in every variant
    if not spec["pair"]:
        return gen
    from flythinker import FlyThinkerForCausalLM

    rsn = llama(args.rsn_hidden, args.seed + 1)
    lam = spec["fusion_lambda"] if args.fusion_lambda is None or spec["fusion_lambda"] == 0 else args.fusion_lambda
    return FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=lam, **fusion)


def train(model, feats: list[dict], collate, args) -> dict:
    result = train_loop(model, feats, collate, steps=args.steps, batch_size=args.batch, lr=args.lr,
                        reasoner_lr=args.lr * args.reasoner_lr_scale, weight_decay=0.01, betas=(0.9, 0.98),
                        warmup_steps=max(1, args.steps // 20), order="sample", seed=args.seed + 2)
    losses = result.losses  # the same batches for every variant (one seed)
    return {"train_seconds": result.seconds, "final_train_loss": sum(losses[-20:]) / len(losses[-20:])}


@torch.no_grad()
def evaluate(model, rows: list[dict], feats: list[dict], collate, tok, args) -> dict:
    model.eval()
    nll_sum, n_tok, texts = 0.0, 0, []
    max_new = max(len(f["response"]) for f in feats) + 2
    for i in range(0, len(rows), args.eval_batch):
        batch = collate(feats[i:i + args.eval_batch])
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        nll_sum += float(model(**batch).loss) * n  # HF loss: mean over the batch's response tokens
        n_tok += n
        prompts = [{k: v for k, v in f.items() if k != "response"} | {"response": [tok.eos_token_id]}
                   for f in feats[i:i + args.eval_batch]]
        p = collate(prompts)  # prompts only (a dummy response token, stripped below), left-padded
        kw = dict(input_ids=p["input_ids"][:, :-1], attention_mask=p["attention_mask"][:, :-1])
        if "reasoner_input_ids" in p:
            kw.update(reasoner_input_ids=p["reasoner_input_ids"][:, :-1],
                      reasoner_attention_mask=p["reasoner_attention_mask"][:, :-1])
        out = model.generate(**kw, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        texts += tok.batch_decode(out[:, kw["input_ids"].shape[1]:], skip_special_tokens=True)
    recs = [r["record"] for r in rows]
    acc = strategy_accuracy(texts, [r.persona.traits for r in recs])
    return {**acc, "rouge_l": mean_rouge_l(texts, [r.response for r in recs]), "nll": nll_sum / n_tok,
            "samples": [{"record_id": r.record_id, "traits": r.persona.traits, "output": t}
                        for r, t in zip(recs[:6], texts[:6], strict=True)]}


def run_variant(name: str, tok, examples, args, fusion: dict) -> dict:
    spec = VARIANTS[name]
    collate = FlyThinkerCollator(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = build_model(spec, len(tok), args, fusion)
    info = train(model, features(examples["train"], spec), collate, args)
    test = examples["test"][: args.n_test]
    feats = features(test, spec)
    res = evaluate(model, test, feats, collate, tok, args)
    resp = sum(len(f["response"]) for f in feats) / len(test)
    res["generator_tokens"] = sum(len(f.get("generator_prompt", f.get("prompt"))) for f in feats) / len(test) + resp
    res["reasoner_tokens"] = (sum(len(f.get("reasoner_prompt", f.get("prompt"))) for f in feats) / len(test)
                              + resp) if spec["pair"] else 0.0
    return {**{k: v for k, v in spec.items() if k != "pair"}, **info, **res}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["variants"])
    v = results["variants"]
    palette = dict(zip(VARIANTS, ["#999999", "#555555", "#1f77b4", "#2ca02c", "#d62728"], strict=True))
    panels = (("strategy_accuracy", "strategy accuracy (0.5 = trait-blind)"), ("rouge_l", "ROUGE-L"),
              ("nll", "NLL / response token"), ("generator_tokens", "generator tokens / example"))
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.8))
    for ax, (key, title) in zip(axes, panels, strict=True):
        bars = ax.bar(names, [v[n][key] for n in names], color=[palette[n] for n in names])
        ax.bar_label(bars, fmt="%.2f" if key != "generator_tokens" else "%.0f", fontsize=8)
        if key == "strategy_accuracy":
            ax.axhline(0.5, color="k", ls=":", lw=1)
            ax.set_ylim(0, 1.05)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"persona-empathy, tiny random-init models ({results['preset']}, test users)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small preset (< 5 min on 2 CPU cores)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-batch", type=int, default=64)
    # One thread by default: on a shared, oversubscribed machine two OpenMP threads spin at barriers and a tiny
    # model's step was measured 15x slower (8 s vs 0.5 s at load average 14 on 2 cores).
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fusion-lambda", type=float, default=None, help="override c/d's 0.5 (e stays 0)")
    ap.add_argument("--reasoner-lr-scale", type=float, default=1.0, help="reasoner lr = lr * this")
    ap.add_argument("--norm-target", default="vocab_mean")
    ap.add_argument("--projection", default="pad")
    ap.add_argument("--out", default=None, help="result file stem (default benchmarks/results/personalization)")
    for k, v in PRESETS["full"].items():
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None, help=f"override the preset ({v} full)")
    args = ap.parse_args(argv)
    preset = "quick" if args.quick else "full"
    for k, v in PRESETS[preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    torch.set_num_threads(args.threads)
    norm = args.norm_target
    fusion = dict(norm_target=float(norm) if norm.replace(".", "", 1).isdigit() else norm, projection=args.projection)
    t0 = time.perf_counter()
    tok, examples = prepare(args.n_users, args.seed, args.history_sessions or None)
    results = {"preset": preset, "args": {k: v for k, v in vars(args).items() if k != "out"}, "vocab": len(tok),
               "n_train": len(examples["train"]), "n_test": min(args.n_test, len(examples["test"])),
               "loadavg_start": os.getloadavg(), "variants": {}}
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
        r = run_variant(name, tok, examples, args, fusion)
        results["variants"][name] = r
        print(f"{name:14s} strategy_acc={r['strategy_accuracy']:.3f} exact={r['exact']:.3f} "
              f"(strategy {r['strategy']:.2f} length {r['length']:.2f} register {r['register']:.2f}) "
              f"rougeL={r['rouge_l']:.3f} nll={r['nll']:.3f} gen_tokens={r['generator_tokens']:.0f} "
              f"train {r['train_seconds']:.0f}s", flush=True)
    v = results["variants"]

    def points(x: str, y: str) -> float:
        return 100 * (v[x]["strategy_accuracy"] - v[y]["strategy_accuracy"])

    if {"a_query_sft", "c_split"} <= set(v):
        results["c_minus_a_points"] = points("c_split", "a_query_sft")
    if {"b_history_sft", "c_split"} <= set(v):
        results["b_minus_c_points"] = points("b_history_sft", "c_split")
        results["generator_token_ratio_c_over_b"] = v["c_split"]["generator_tokens"] / v["b_history_sft"][
            "generator_tokens"]
    if {"a_query_sft", "e_lambda0"} <= set(v):
        results["e_minus_a_points"] = points("e_lambda0", "a_query_sft")
    results["loadavg_end"] = os.getloadavg()
    results["total_seconds"] = time.perf_counter() - t0
    stem = Path(args.out) if args.out else RESULTS / "personalization"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results, stem.with_suffix(".png"))
    print({k: round(x, 2) for k, x in results.items() if k.endswith(("points", "c_over_b"))},
          f"total {results['total_seconds']:.0f}s -> {stem.with_suffix('.json')}")
    return results


if __name__ == "__main__":
    main()
