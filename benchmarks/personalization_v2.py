"""Personalisation on persona-empathy v2 with the library's recipe (flythinker.training.recipe), SmolLM2-135M-Instruct.

    python -m benchmarks.personalization_v2 train [--stage1-steps 60 --stage2-steps 80 --b-steps 60]
    python -m benchmarks.personalization_v2 train-b
    python -m benchmarks.personalization_v2 eval [--variants a,c,b,shipped_v1]
    python -m benchmarks.personalization_v2 ship   # c + its figures -> flythinker/pretrained/<name>

Variants (generator LoRA rank 8 on all seven linear maps; the same seed, data order and batch size):
  a   the recipe's stage 1: the generator's LoRA alone on the query (what the generator reads in split context);
  c   the recipe (persona-pair): a, then the fusion + the generator's LoRA on the opening-weighted loss;
  b   the generator's LoRA on the full view (history + query in its prompt), `--b-steps` steps;
  shipped_v1  the pair shipped before v2 (trained on persona-empathy v1).
Each trained variant's tensors go to the run folder (safetensors) and are reused on a rerun. Evaluation
(flythinker.evaluation.persona): likelihood preference and greedy generation on test users of held-out phrasing
families, the hand-written users, 95% user-bootstrap intervals, paired differences; results in
benchmarks/results/personalization_v2.json + .png.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BASE = "smollm2-135m-instruct"
SHIPPED = "smollm2-135m-persona-empathy"
QUICK = {"skip": "a training benchmark on the real SmolLM2 pair (tens of minutes per variant)"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg} (load {os.getloadavg()[0]:.1f})", flush=True)


def recipe_of(args):
    from flythinker.training.recipe import RECIPES

    return RECIPES["persona-pair"].replace(stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
                                           max_reasoner_tokens=args.max_reasoner_tokens,
                                           reasoner_lora_rank=args.reasoner_lora_rank,
                                           reasoner_lora_layers=args.reasoner_lora_layers,
                                           reasoner_lr=args.reasoner_lr)


def train_records(args):
    from flythinker.persona import load_dataset
    from flythinker.training.recipe import select_per_user

    return select_per_user(load_dataset("persona-empathy", "train", version=2), args.per_user, args.train_users)


def curve_callback(name: str, model_fn, records, every: int, tok, budget: int, view: str, out: list):
    """A TrainerCallback: likelihood preference on `records` every `every` steps (model_fn() gives the model)."""
    from transformers import TrainerCallback

    from flythinker.persona.preference import accuracy, preference

    class Curve(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                m = model_fn()
                m.eval()
                acc = accuracy(preference(m, tok, records, ("strategy", "register"), max_reasoner_tokens=budget,
                                          view=view))
                out.append({"step": state.global_step, **acc})
                log(f"{name}: step {state.global_step} curve {acc}")
                m.train()

    return Curve()


def train_pair(args) -> None:
    """Variants a (stage 1) and c (stage 2) with the recipe's building blocks; a is stage 1's snapshot. A run
    folder that already holds a (``a.safetensors`` + ``a.json``, e.g. copied from a run with the same stage 1)
    resumes at stage 2."""
    import json

    from safetensors.torch import load_file, save

    from flythinker.hub import atomic_write_bytes, atomic_write_json, load_tokenizer
    from flythinker.persona import load_dataset
    from flythinker.training.collator import FlyThinkerCollator
    from flythinker.training.recipe import (
        build_pair,
        calibrate,
        record_features,
        save_pair_deltas,
        select_per_user,
        train_stage1,
        train_stage2,
    )
    from flythinker.training.trainable import trainable_state_dict

    run = Path(args.run_dir)
    if (run / "c.safetensors").exists():
        log("a and c: trained in an earlier run")
        return
    recipe, tok = recipe_of(args), load_tokenizer(BASE)
    records = train_records(args)
    curve_recs = select_per_user(load_dataset("persona-empathy", "validation", version=2), 1, args.curve_users)
    collator = FlyThinkerCollator(tokenizer=tok, add_eos=True)
    model = build_pair(BASE, BASE, recipe)
    split = record_features(records, tok, recipe, "split")
    entry = {"recipe": recipe.__dict__ | {"lora_targets": list(recipe.lora_targets)}, "records": len(records),
             "users": len({r.user_id for r in records})}
    entry["calibration"] = calibrate(model, split, collator, recipe)
    log(f"calibrated {entry['calibration']}")
    if (run / "a.safetensors").exists() and (run / "a.json").exists():
        missing, unexpected = model.load_state_dict(load_file(run / "a.safetensors"), strict=False)
        if unexpected:
            raise ValueError(f"a.safetensors: unexpected keys {unexpected[:3]}")
        entry["a"] = json.loads((run / "a.json").read_text())
        log("a: resumed from the run folder")
    else:
        curve_a: list = []
        entry["a"] = train_stage1(model, records, tok, collator, recipe, run / "a",
                                  callbacks=[curve_callback("a", lambda: model.generator, curve_recs,
                                                            args.curve_every, tok, recipe.max_reasoner_tokens,
                                                            "query", curve_a)])
        entry["a"]["curve"] = curve_a
        atomic_write_bytes(run / "a.safetensors",
                           save({k: v.clone() for k, v in trainable_state_dict(model).items()}))
        atomic_write_json(run / "a.json", entry["a"])
        log(f"a: {recipe.stage1_steps} steps in {entry['a']['seconds']:.0f} s")
    curve_c: list = []
    entry["c"] = train_stage2(model, split, collator, recipe, run / "c",
                              callbacks=[curve_callback("c", lambda: model, curve_recs, args.curve_every, tok,
                                                        recipe.max_reasoner_tokens, "query", curve_c)])
    entry["c"]["curve"] = curve_c
    state = {k: v.clone().contiguous() for k, v in trainable_state_dict(model).items()}
    atomic_write_bytes(run / "c.safetensors", save(state))
    fusion = {k: v.clone().contiguous() for k, v in model.fusion_state_dict().items()}
    atomic_write_bytes(run / "c_fusion.safetensors", save(fusion))
    if not recipe.reasoner_lora_rank:  # the shipped-pair format carries the generator's LoRA only
        save_pair_deltas(model, run / "ship", recipe, base=BASE)
    atomic_write_json(run / "train.json", entry)
    log(f"c: {recipe.stage2_steps} steps in {entry['c']['seconds']:.0f} s")


def train_b(args) -> None:
    """Variant b: the generator's LoRA on the full view (history + query), same LoRA, seed, lr, batch."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save

    from flythinker.hub import atomic_write_bytes, atomic_write_json, load_pretrained
    from flythinker.persona import load_dataset
    from flythinker.training.collator import FlyThinkerCollator
    from flythinker.training.recipe import record_features, select_per_user, train_stage

    run = Path(args.run_dir)
    if (run / "b.safetensors").exists():
        log("b: trained in an earlier run")
        return
    recipe = recipe_of(args)
    gen, tok = load_pretrained(BASE)
    torch.manual_seed(recipe.seed)
    model = get_peft_model(gen, LoraConfig(r=recipe.lora_rank, lora_alpha=2 * recipe.lora_rank,
                                           target_modules=list(recipe.lora_targets)))
    records = train_records(args)
    curve_recs = select_per_user(load_dataset("persona-empathy", "validation", version=2), 1, args.curve_users)
    curve: list = []
    entry = train_stage(model, record_features(records, tok, recipe, "shared"),
                        FlyThinkerCollator(tokenizer=tok, add_eos=True), steps=args.b_steps, lr=recipe.stage1_lr,
                        recipe=recipe, output_dir=run / "b",
                        callbacks=[curve_callback("b", lambda: model.get_base_model(), curve_recs, args.curve_every,
                                                  tok, recipe.max_reasoner_tokens, "full", curve)])
    entry["curve"] = curve
    state = {k: v.detach().clone().contiguous() for k, v in model.named_parameters() if v.requires_grad}
    atomic_write_bytes(run / "b.safetensors", save(state))
    atomic_write_json(run / "train_b.json", entry)
    log(f"b: {args.b_steps} steps in {entry['seconds']:.0f} s")


def _points(s: dict) -> list:
    """A bootstrap summary as [mean, [lo, hi]] in points."""
    return [round(100 * s["mean"]), [round(100 * x) for x in s["ci95"]]]


def ship(args) -> None:
    """Variant c as the shipped pair: the run's deltas + a pair.json that names the one command reproducing it
    (`recipe_spec`: what `flythinker demo --retrain` reruns) and its measured figures."""
    import json

    from flythinker.hub import atomic_write_bytes, atomic_write_json

    run, result = Path(args.run_dir), json.loads(Path(args.out).read_text())
    train = json.loads((run / "train.json").read_text())
    info = json.loads((run / "ship" / "pair.json").read_text())
    v = result["variants"]
    gen = {k: _points(v["c"]["heldout_generation"][k]) for k in ("strategy", "length", "register")}
    measured = {"benchmark": "benchmarks/results/personalization_v2.json", "held_out_users":
                result["data"]["heldout_users"], "generation_c": gen,
                "generation_a": {k: _points(v["a"]["heldout_generation"][k]) for k in gen},
                "preference_c": {k: _points(v["c"]["heldout_preference"][k]) for k in ("strategy", "register")},
                "preference_c_lambda0": {k: _points(v["c_lambda0"]["heldout_preference"][k])
                                         for k in ("strategy", "register")},
                "train_seconds": {"calibration": train["calibration"]["seconds"], "a": train["a"]["seconds"],
                                  "c": train["c"]["seconds"]}}
    spec = {"recipe": "persona-pair", "dataset": "persona-empathy", "version": 2, "train_users": args.train_users,
            "per_user": args.per_user, "changes": {"stage1_steps": args.stage1_steps,
                                                   "stage2_steps": args.stage2_steps,
                                                   "max_reasoner_tokens": args.max_reasoner_tokens}}
    info.update({"trained": "flythinker.training.recipe persona-pair on persona-empathy v2 (generator LoRA rank 8 on "
                            "7 linear maps, zero projection on standardised latents calibrated at the reply "
                            "boundary, stage 1 the generator's LoRA alone, stage 2 the fusion + LoRA on the "
                            "opening-weighted loss; reasoner frozen, SmolLM2 as shipped)",
                 "recipe": f"flythinker train --recipe persona-pair --generator {BASE} --data "
                           f"bundled:persona-empathy@2:train --users {args.train_users} --per-user {args.per_user} "
                           f"--stage1-steps {args.stage1_steps} --stage2-steps {args.stage2_steps} "
                           f"--reasoner-max-length {args.max_reasoner_tokens} --output-dir runs/pair --ship-dir "
                           f"runs/pair/shipped",
                 "recipe_spec": spec, "measured": measured})
    dest = ROOT / "flythinker" / "pretrained" / SHIPPED
    atomic_write_bytes(dest / "deltas.safetensors", (run / "ship" / "deltas.safetensors").read_bytes())
    atomic_write_json(dest / "pair.json", info)
    log(f"shipped {dest}: {json.dumps(measured['generation_c'])}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("phase", choices=("train", "train-b", "eval", "ship"))
    p.add_argument("--train-users", type=int, default=560)
    p.add_argument("--per-user", type=int, default=2)
    p.add_argument("--stage1-steps", type=int, default=60)
    p.add_argument("--stage2-steps", type=int, default=80)
    p.add_argument("--b-steps", type=int, default=60)
    p.add_argument("--max-reasoner-tokens", type=int, default=320)
    p.add_argument("--reasoner-lora-rank", type=int, default=0, help="0: the reasoner stays frozen (the recipe)")
    p.add_argument("--reasoner-lora-layers", type=int, default=8, help="the reasoner's top layers that get LoRA")
    p.add_argument("--reasoner-lr", type=float, default=1e-3)
    p.add_argument("--curve-users", type=int, default=24)
    p.add_argument("--curve-every", type=int, default=20)
    p.add_argument("--variants", default="a,c,b,shipped_v1")
    p.add_argument("--test-users", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--skip-generation", action="store_true", help="eval: likelihood preference only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--run-dir", default=str(ROOT / ".cache" / "personalization_v2"))
    p.add_argument("--out", default=str(RESULTS / "personalization_v2.json"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    t = time.time()
    if args.phase == "train":
        train_pair(args)
    elif args.phase == "train-b":
        train_b(args)
    elif args.phase == "ship":
        ship(args)
    else:
        from benchmarks.personalization_v2_eval import evaluate_all

        evaluate_all(args)
    log(f"{args.phase} done in {time.time() - t:.0f} s")


if __name__ == "__main__":
    main()
