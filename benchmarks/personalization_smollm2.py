"""Personalisation on the real SmolLM2-135M-Instruct pair: variants with one LoRA budget, data order and step count.

    .venv/bin/python -m benchmarks.personalization_smollm2 [--variants a,c6] [--steps 120 --fusion-steps 240]
        [--run-dir .cache/personalization_smollm2] [--ship --ship-variant c6]

The defaults are the shipped pair's recipe: variants a then c6 (240 stage-2 steps), each scored, and the generator as
shipped (42 min on this 2-core CPU, partly shared with a CI run: a 1136 s and c6 1050 s of training, the rest scoring;
benchmarks/results/personalization_smollm2_long.json). The variants in personalization_smollm2.json ran 120 stage-2
steps (`--fusion-steps 120`).

Variants (persona-empathy, held-out users; the generator's LoRA is rank 8 on all seven linear maps of every layer):
  shipped  the generator as shipped (no training);
  a        generator LoRA SFT on the query only (what the generator reads in split context);
  b        generator LoRA SFT on the full view (history + query in its context);
  c        flythinker split context: the reasoner (SmolLM2, frozen) reads history + query, the generator the query;
           trained: the generator's LoRA + the fusion (zero-initialised projection on standardised latents,
           `latent_norm="standardize"`, calibrated on the training batches), at lambda `--lam`;
  d        flythinker shared context: both models read history + query, trained like c (the generator's LoRA + the
           fusion from step 0); the latent is fused from the reply boundary on (`fuse_prompt=False`: the boundary
           latent is the one the split pairs fuse too);
  c2       two stages: a's trained generator LoRA, frozen, then the fusion alone for `--fusion-steps` steps;
  c3       c2 on a loss that weighs the first `--opening-tokens` response tokens `--opening-weight`x, where the
           strategy is decided (flythinker.training.opening_loss; benchmarks/latent_probe_smollm2.py says why);
  c4       c3 with whitened gradient steps for the projection (flythinker.training.whitened_projection: P = P' @ M,
           M from `--whiten-batches` batches of boundary latents, folded after training);
  c5       c3 with a reasoner made of SmolLM2's first `--reasoner-layers` layers (flythinker.truncate): per token it
           costs k/30 of the generator;
  c6       c3 with the generator's LoRA trained too in stage 2 (from a's weights, at `--stage2-lora-lr`);
  c7       c3 for 2 x `--fusion-steps` stage-2 steps (a second pass over the same batches);
  e        c trained at lambda 0: must equal a (its losses are compared step by step; only `--e-steps` steps run).
Measured per variant:
  likelihood preference on >= 300 records of >= 100 test users: the reference reply's opening NLL against the same
    reply with strategy (resp. register) flipped (flythinker.persona.preference). Length is scored by generation
    only: a summed NLL always favours the shorter reply, whatever the model learned;
  generation: greedy replies (the fastest token-identical path, LoRA merged) for one query of each of >= 100 test
    users, scored by the rule-based metric (flythinker.persona.metrics) and ROUGE-L against the reference;
  95% bootstrap CIs over users, paired differences (c - a, c - b) with their intervals;
  accuracy against training steps (likelihood preference on validation users every `--curve-every` steps).
Every trained variant is saved to the run folder (safetensors, atomically) and skipped on a rerun: an interrupted
run resumes where it stopped. Results: benchmarks/results/personalization_smollm2.json + .png.
`--ship` writes variant `--ship-variant`'s tensors as the shipped pair
flythinker/pretrained/smollm2-135m-persona-empathy.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from benchmarks.personalization_fusion import bootstrap  # noqa: E402  (user-clustered bootstrap)

# `flythinker bench` contract (flythinker/cli/bench.py): no quick mode, and why
QUICK = {"skip": "the shipped pair's training recipe (~40 min)"}

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREF_TRAITS = ("strategy", "register")
GEN_TRAITS = ("strategy", "length", "register")
# The two-stage pairs: variant a's trained generator LoRA, frozen, then the fusion alone (joint: and the LoRA), with
# these options:
#   opening    the loss weighs the reply's opening (flythinker.training.opening_loss)
#   whiten     the projection's gradient steps see whitened inputs (flythinker.training.whitened_projection)
#   truncated  the reasoner is SmolLM2's first --reasoner-layers layers (flythinker.truncate)
#   joint      stage 2 also trains the generator's LoRA (from a's weights, at --stage2-lora-lr)
#   long       stage 2 runs 2 x --fusion-steps steps (two passes over the training batches)
STAGED = {"c2": frozenset(), "c3": frozenset({"opening"}), "c4": frozenset({"opening", "whiten"}),
          "c5": frozenset({"opening", "truncated"}), "c6": frozenset({"opening", "joint"}),
          "c7": frozenset({"opening", "long"})}
PAIRS = ("c", "d", *STAGED, "e")  # the variants that are FlyThinker pairs
FULL_VIEW = ("b", "d")  # the variants whose generator reads the full view (history + query)
RUN_ONLY_ARGS = ("variants", "out", "plot_only", "ship", "ship_dir", "ship_variant")  # not part of a recipe
CURVED = ("a", "b", "c", "d", *STAGED)  # the variants whose accuracy is tracked against training steps
SHIPPED = "smollm2-135m-persona-empathy"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg} (load {os.getloadavg()[0]:.1f})", flush=True)


# ---------------------------------------------------------------------------------------------- data
def uses(variant: str, option: str) -> bool:
    """Whether a two-stage variant trains its fusion with `option` (see STAGED)."""
    return option in STAGED.get(variant, ())


def select(records, per_user: int, users: int):
    """The first `per_user` queries of each of the first `users` users (records are grouped by user)."""
    by_user: dict[str, list] = {}
    for r in records:
        by_user.setdefault(r.user_id, []).append(r)
    chosen = list(by_user.values())[:users]
    return [r for rs in chosen for r in rs[:per_user]]


def features(views, variant: str) -> list[dict]:
    if variant in FULL_VIEW:
        return [v.example("shared") for v in views]
    return [v.example("split" if variant in PAIRS else "generator") for v in views]


# ---------------------------------------------------------------------------------------------- models
def load_variant_model(variant: str, args):
    """(model, tokenizer): a plain SmolLM2 with LoRA (a, b) or a pair with generator LoRA (c, d, e, staged)."""
    from peft import LoraConfig, get_peft_model

    from flythinker import FlyThinkerForCausalLM
    from flythinker.hub import load_pretrained
    from flythinker.training import apply_lora, set_trainable

    gen, tok = load_pretrained("smollm2-135m-instruct")
    torch.manual_seed(args.seed)  # the same LoRA initialisation in every variant
    if variant in ("a", "b"):
        for p in gen.parameters():
            p.requires_grad_(False)
        model = get_peft_model(gen, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=LORA_TARGETS))
        return model, tok
    rsn, _ = load_pretrained("smollm2-135m-instruct")
    if uses(variant, "truncated"):  # a reasoner of SmolLM2's first k layers: per token it costs k/30 of the generator
        from flythinker.truncate import truncated_reasoner

        rsn = truncated_reasoner(rsn, args.reasoner_layers)
    lam = 0.0 if variant == "e" else args.lam
    shared = {"fuse_prompt": False} if variant == "d" else {}
    model = FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=lam, projection="zero",
                                            latent_norm="standardize", parallel="off",
                                            loss_impl="naive" if uses(variant, "opening") else "fused", **shared)
    torch.manual_seed(args.seed)
    apply_lora(model, "generator", r=args.rank, alpha=2 * args.rank, target_modules=LORA_TARGETS)
    set_trainable(model, ("generator", "projection"))
    if variant in STAGED:  # stage 2: a's trained generator LoRA, frozen; only the fusion trains
        from safetensors.torch import load_file

        a_path = Path(args.run_dir) / "a.safetensors"
        if not a_path.exists():
            raise SystemExit(f"variant {variant} starts from variant a's generator: train a first "
                             f"(--variants a,{variant})")
        state = {"generator." + k.removeprefix("base_model.model."): v for k, v in load_file(a_path).items()}
        load_state(model, state)
        set_trainable(model, ("generator", "projection") if uses(variant, "joint") else ("projection",))
    return model, tok


def named(model) -> torch.nn.Module:
    """The module whose tensor names are the checkpoint's: a pair's fused `.model` (`generator.*`, `latent_proj.*`;
    the pair itself names them `model.generator.*`), a plain LM itself."""
    return model.model if hasattr(model, "fusion_state_dict") else model


def trained_state(model) -> dict[str, torch.Tensor]:
    from flythinker.training import trainable_state_dict

    state = trainable_state_dict(named(model))
    if hasattr(model, "fusion_state_dict"):
        state.update(model.fusion_state_dict())
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def load_state(model, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = named(model).load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"saved state has keys the model lacks: {unexpected[:5]}")


# ---------------------------------------------------------------------------------------------- training
_LATENT_STORES: dict = {}  # reasoner digest -> ReasonerLatentCache, shared by this run's staged variants


def latent_store(model):
    """This run's store of `model`'s frozen-reasoner latents (one per distinct reasoner)."""
    from flythinker.training.reasoner_cache import ReasonerLatentCache, reasoner_digest

    return _LATENT_STORES.setdefault(reasoner_digest(model.reasoner), ReasonerLatentCache())


class _Stop(Exception):
    """Raised from the progress callback to end a run early (variant e), carrying the losses so far."""

    def __init__(self, losses: list[float]) -> None:
        super().__init__()
        self.losses = losses


def train_variant(variant: str, args, data, run_dir: Path, curve_records) -> dict:
    """Train one variant (or load it from the run folder); returns its entry {losses, seconds, curve, ...}."""
    from safetensors.torch import load_file, save

    from flythinker.hub import atomic_write_bytes, atomic_write_json
    from flythinker.latent_norm import calibrate_latent_norm, capture_latents
    from flythinker.persona import build_views
    from flythinker.training import FlyThinkerCollator
    from flythinker.training.loop import LoopResult, batch_indices, train_loop
    from flythinker.training.opening_loss import opening_weighted_loss
    from flythinker.training.reasoner_cache import cached_reasoner_latents
    from flythinker.training.whitened_projection import fold_projection, projection_inputs, whiten_projection

    path, meta_path = run_dir / f"{variant}.safetensors", run_dir / f"{variant}.json"
    model, tok = load_variant_model(variant, args)
    if path.exists() and meta_path.exists():
        load_state(model, load_file(path))
        log(f"variant {variant}: loaded from {path}")
        return {"model": model, "tok": tok, **json.loads(meta_path.read_text())}
    views = [build_views(r, tok, mode="split", max_reasoner_tokens=args.max_reasoner_tokens, warn=False)
             for r in data]
    feats = features(views, variant)
    collator = FlyThinkerCollator(tokenizer=tok, add_eos=True)
    entry: dict = {"variant": variant, "records": len(feats), "users": len({r.user_id for r in data}),
                   "args": {k: v for k, v in vars(args).items() if k not in RUN_ONLY_ARGS}}
    if variant in PAIRS:
        t = time.time()
        order = batch_indices(len(feats), args.calibration_batches, args.batch, seed=args.seed + 1)
        entry["calibration"] = calibrate_latent_norm(model, (collator([feats[i] for i in b]) for b in order),
                                                     positions=args.calibrate_on)
        entry["calibration"]["seconds"] = time.time() - t
        log(f"variant {variant}: calibrated latent statistics {entry['calibration']}")
    if uses(variant, "whiten"):
        t = time.time()
        order = batch_indices(len(feats), args.whiten_batches, args.batch, seed=args.seed + 2)
        inputs = projection_inputs(model, capture_latents(model, (collator([feats[i] for i in b]) for b in order),
                                                          positions="boundary"))
        whiten_projection(model, inputs, args.shrink)
        entry["whitening"] = {"latents": len(inputs), "shrink": args.shrink, "seconds": time.time() - t}
        log(f"variant {variant}: projection steps whitened on {entry['whitening']}")
    curve: list[dict] = []

    def progress(step: int, losses: list[float]) -> None:
        if step % 10 == 0 or step == steps - 1:
            log(f"variant {variant}: step {step + 1}/{steps} loss {losses[-1]:.3f}")
        if curve_records and ((step + 1) % args.curve_every == 0 or step == steps - 1):
            model.eval()
            acc = preference_rows(model, tok, curve_records, variant, args)
            curve.append({"step": step + 1, **{t: sum(r[t] for r in acc) / len(acc) for t in PREF_TRAITS}})
            log(f"variant {variant}: curve {curve[-1]}")
            model.train()

    # e runs a's whole schedule (same warm-up and decay) and stops after --e-steps: its losses must equal a's
    steps = (args.fusion_steps * (2 if uses(variant, "long") else 1)) if variant in STAGED else args.steps
    stop_at = args.e_steps if variant == "e" else None

    def progress_or_stop(step: int, losses: list[float]) -> None:
        progress(step, losses)
        if stop_at is not None and step + 1 == stop_at:
            raise _Stop(losses)

    loss_fn = (opening_weighted_loss(args.opening_tokens, args.opening_weight) if uses(variant, "opening")
               else None)
    torch.manual_seed(args.seed)
    t = time.time()
    lr = args.stage2_lora_lr if uses(variant, "joint") else args.lr  # generator parameters' lr (stage 2: none)
    # the reasoner is frozen in every staged variant: its latents are computed once per batch (a second pass, or
    # another staged variant of this run with the same reasoner, reads them; flythinker.training.reasoner_cache)
    store = latent_store(model) if variant in STAGED else None
    seen = {"misses": store.misses, "hits": store.hits} if store is not None else {}
    try:
        with cached_reasoner_latents(model, store) if store is not None else nullcontext():
            res = train_loop(model, feats, collator, steps=steps, batch_size=args.batch, lr=lr,
                             fusion_lr=args.fusion_lr if variant in PAIRS else None, warmup_steps=args.warmup,
                             seed=args.seed, progress=progress_or_stop, loss_fn=loss_fn)
    except _Stop as stop:
        res = LoopResult(list(stop.losses), time.time() - t)
        steps = stop_at
    if store is not None:  # this variant's reasoner batches: run (misses) and read from the store (hits)
        entry["reasoner_cache"] = {"misses": store.misses - seen["misses"], "hits": store.hits - seen["hits"],
                                   "stored_bytes": store.nbytes}
    fold_projection(model)  # a plain projection again (no-op unless whitened)
    entry.update(losses=res.losses, seconds=res.seconds, steps=steps, curve=curve)
    atomic_write_bytes(path, save(trained_state(model)))  # safetensors bytes, written atomically
    atomic_write_json(meta_path, entry)
    log(f"variant {variant}: trained {steps} steps in {res.seconds:.0f} s, loss {res.losses[0]:.2f} -> "
        f"{sum(res.losses[-5:]) / len(res.losses[-5:]):.2f}")
    return {"model": model, "tok": tok, **entry}


# ---------------------------------------------------------------------------------------------- evaluation
def preference_rows(model, tok, records, variant: str, args) -> list[dict]:
    from flythinker.persona.preference import preference

    view = "full" if variant in FULL_VIEW else "query"
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    rows = preference(inner, tok, records, PREF_TRAITS, max_reasoner_tokens=args.max_reasoner_tokens, view=view)
    return [{"user": r.user_id, "record": r.record_id, **{t: float(row[t]) for t in PREF_TRAITS}}
            for r, row in zip(records, rows)]


@torch.no_grad()
def generate_rows(model, tok, records, variant: str, args) -> tuple[list[dict], dict]:
    """Greedy replies in batches (left-padded); per record the metric's hits and ROUGE-L; plus prompt accounting."""
    from flythinker.persona import build_views, generate_inputs
    from flythinker.persona.metrics import classify_response, rouge_l

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # split context: the reasoner reads its own view; a full-view variant's model reads the long view itself
    context = "shared" if variant in FULL_VIEW else "split" if variant in PAIRS else "generator"
    rows, g_tokens, full_tokens, new_tokens, t0 = [], 0, 0, 0, time.time()
    for i in range(0, len(records), args.gen_batch):
        recs = records[i:i + args.gen_batch]
        views = [build_views(r, tok, mode="split", max_reasoner_tokens=args.max_reasoner_tokens, warn=False)
                 for r in recs]
        inputs = generate_inputs(views, pad, context)
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=pad)[:, inputs["input_ids"].shape[1]:]
        g_tokens += int(inputs["attention_mask"].sum())  # what the generator read
        for r, v, seq in zip(recs, views, out):
            text = tok.decode(seq, skip_special_tokens=True).strip()
            pred = classify_response(text)
            rows.append({"user": r.user_id, "record": r.record_id, "reply": text,
                         **{t: float(pred[t] == r.persona.traits[t]) for t in GEN_TRAITS},
                         "rouge_l": rouge_l(text, r.response)})
            full_tokens += len(v.reasoner_prompt_ids)
            new_tokens += int((seq != pad).sum())
        log(f"variant {variant}: generated {len(rows)}/{len(records)}")
    seconds = time.time() - t0
    return rows, {"generator_prompt_tokens": g_tokens / len(rows), "full_view_tokens": full_tokens / len(rows),
                  "seconds": seconds, "new_tokens": new_tokens, "tokens_per_s": new_tokens / seconds}


def for_decoding(model, variant: str):
    """The model with its LoRA merged (decoding pays no adapter ops)."""
    if variant in ("a", "b"):
        return model.merge_and_unload().eval()
    if variant in PAIRS:
        from flythinker.training import merge_lora

        merge_lora(model)
    return model.eval()


def summarise(rows: list[dict], traits, base: list[dict] | None = None) -> dict:
    out = {t: bootstrap(rows, lambda r, t=t: r[t]) for t in traits}
    if base is not None:  # paired: the same records, matched by id
        by_rec = {b["record"]: b for b in base}
        other = [by_rec[r["record"]] for r in rows]
        out.update({f"{t}_minus": bootstrap(rows, lambda r, t=t: r[t], other) for t in traits})
    return out


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="a,c6", help="comma-separated; the default is the shipped pair's recipe")
    p.add_argument("--train-users", type=int, default=480)
    p.add_argument("--train-per-user", type=int, default=2)
    p.add_argument("--pref-users", type=int, default=100)
    p.add_argument("--pref-per-user", type=int, default=3)
    p.add_argument("--gen-users", type=int, default=100)
    p.add_argument("--curve-users", type=int, default=24)
    p.add_argument("--curve-every", type=int, default=20)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--e-steps", type=int, default=10)
    p.add_argument("--fusion-steps", type=int, default=240,
                   help="staged variants (c2-c7): stage-2 steps on a's generator (the shipped c6: 240; the variants "
                        "in personalization_smollm2.json ran 120)")
    p.add_argument("--opening-tokens", type=int, default=4, help="c3: the response tokens the loss weights up")
    p.add_argument("--opening-weight", type=float, default=10.0,
                   help="c3: their weight (flythinker.training.opening_loss)")
    p.add_argument("--whiten-batches", type=int, default=60, help="c4: batches of boundary latents for M")
    p.add_argument("--shrink", type=float, default=0.1, help="c4: M's ridge, a fraction of the mean eigenvalue")
    p.add_argument("--reasoner-layers", type=int, default=8, help="c5: the reasoner's layers (SmolLM2's first k)")
    p.add_argument("--ship-variant", default="c6", choices=("c", *STAGED))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fusion-lr", type=float, default=3e-3)
    p.add_argument("--stage2-lora-lr", type=float, default=3e-4, help="c6: the generator LoRA's lr in stage 2")
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--calibrate-on", default="boundary", choices=("fused", "boundary"),
                   help="latents the standardisation statistics come from (flythinker.latent_norm)")
    p.add_argument("--max-reasoner-tokens", type=int, default=160)
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--gen-batch", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--run-dir", default=str(ROOT / ".cache" / "personalization_smollm2"))
    p.add_argument("--out", default=str(RESULTS / "personalization_smollm2.json"))
    p.add_argument("--ship", action="store_true", help="write variant --ship-variant as the shipped pair")
    p.add_argument("--ship-dir", default=None, help="write the shipped pair's pair.json + deltas here instead of "
                   "flythinker/pretrained (implies --ship)")
    p.add_argument("--plot-only", action="store_true")
    return p.parse_args(argv)


def _means(summary: dict) -> str:
    return json.dumps({k: round(v["mean"], 3) for k, v in summary.items()})


def evaluate(name: str, entry: dict, args, test_pref, test_gen, result: dict) -> None:
    """Likelihood preference, then greedy generation (LoRA merged first) of one variant into result["variants"]."""
    model, tok = entry.get("model"), entry.get("tok")
    slot = result["variants"][name]
    t = time.time()
    pref = preference_rows(model, tok, test_pref, name, args)
    slot.update(preference=summarise(pref, PREF_TRAITS), preference_rows=pref, preference_seconds=time.time() - t)
    log(f"variant {name}: preference {_means(slot['preference'])}")
    model = for_decoding(model, name) if name != "shipped" else model
    gen, acct = generate_rows(model, tok, test_gen, name, args)
    slot.update(generation=summarise(gen, GEN_TRAITS + ("rouge_l",)), generation_rows=gen,
                generation_accounting=acct)
    log(f"variant {name}: generation {_means(slot['generation'])}")


def compare(result: dict) -> None:
    """Paired differences between variants (same records) with their bootstrap intervals."""
    v = result["variants"]
    diffs = {}
    pairs = [(x, y) for x in ("c", "d", *STAGED) for y in ("a", "b", "shipped")]
    pairs += [("c3", "c2"), ("c4", "c3"), ("c5", "c3"), ("c6", "c3"), ("c7", "c3"), ("a", "shipped"), ("b", "a")]
    for x, y in pairs:
        if x in v and y in v and "generation_rows" in v[x] and "generation_rows" in v[y]:
            diffs[f"{x}-{y}"] = {
                "generation": summarise(v[x]["generation_rows"], GEN_TRAITS + ("rouge_l",), v[y]["generation_rows"]),
                "preference": summarise(v[x]["preference_rows"], PREF_TRAITS, v[y]["preference_rows"])}
    result["differences"] = {k: {kind: {t: s for t, s in d.items() if t.endswith("_minus")} for kind, d in dd.items()}
                             for k, dd in diffs.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if args.plot_only:  # recompute the paired differences and redraw the PNG from --out
        from flythinker.hub import atomic_write_json

        result = json.loads(out.read_text())
        compare(result)
        atomic_write_json(out, result)
        plot(result, out.with_suffix(".png"))
        return
    torch.set_num_threads(args.threads)
    from flythinker.hub import atomic_write_json, load_pretrained
    from flythinker.persona import make_persona_empathy

    t_all, load0 = time.time(), os.getloadavg()
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = make_persona_empathy()
    train = select(data["train"], args.train_per_user, args.train_users)
    curve = select(data["validation"], 1, args.curve_users)
    test_pref = select(data["test"], args.pref_per_user, args.pref_users)
    test_gen = select(data["test"], 1, args.gen_users)
    result = {"args": vars(args), "loadavg_start": load0, "torch": torch.__version__, "variants": {},
              "data": {"train_records": len(train), "train_users": len({r.user_id for r in train}),
                       "pref_records": len(test_pref), "pref_users": len({r.user_id for r in test_pref}),
                       "gen_records": len(test_gen), "gen_users": len({r.user_id for r in test_gen})}}

    def save() -> None:
        result["wall_s"] = time.time() - t_all
        result["loadavg_now"] = os.getloadavg()
        atomic_write_json(out, result)

    earlier = earlier_variants(out, result)  # a rerun keeps what earlier runs measured (not only what it names)
    done = {k: v for k, v in earlier.items() if "generation" in v}  # fully evaluated: not redone
    result["variants"].update(earlier)
    if "shipped" in done:
        result["variants"]["shipped"] = done["shipped"]
    else:
        base, tok = load_pretrained("smollm2-135m-instruct")
        result["variants"]["shipped"] = {}
        evaluate("shipped", {"model": base.eval(), "tok": tok}, args, test_pref, test_gen, result)
        save()
        del base
    names = args.variants.split(",")
    for name in names:
        if name in done and name != "e":
            result["variants"][name] = done[name]
            log(f"variant {name}: evaluated in an earlier run ({out}), kept")
            if name == "a" and set(STAGED) & set(names) and not (run_dir / "a.safetensors").exists():
                train_variant(name, args, train, run_dir, None)  # a staged variant starts from a's weights
            if name == args.ship_variant and (args.ship or args.ship_dir):  # its weights are in the run folder
                ship(train_variant(name, args, train, run_dir, None)["model"], result, args)
            continue
        entry = train_variant(name, args, train, run_dir, curve if name in CURVED else None)
        result["variants"][name] = {k: v for k, v in entry.items() if k not in ("model", "tok")}
        if name == "e":
            a = result["variants"].get("a")
            if a is not None:
                n = len(entry["losses"])
                diff = max(abs(x - y) for x, y in zip(entry["losses"], a["losses"][:n]))
                result["variants"]["e"]["max_abs_loss_diff_vs_a"] = diff
                log(f"variant e (lambda 0) vs a over {n} steps: max |loss diff| {diff:.2e}")
            save()
            continue
        if name == args.ship_variant and (args.ship or args.ship_dir):
            ship(entry["model"], result, args)
        evaluate(name, entry, args, test_pref, test_gen, result)
        compare(result)
        save()
        del entry
    compare(result)
    save()
    plot(result, out.with_suffix(".png"))
    log(f"done in {time.time() - t_all:.0f} s")


def earlier_variants(out: Path, result: dict) -> dict:
    """Every variant entry an earlier run wrote to `out` on the same data selection (else {})."""
    if not out.exists():
        return {}
    try:
        old = json.loads(out.read_text())
    except ValueError:
        return {}
    if old.get("data") != result["data"]:
        return {}
    return old.get("variants", {})


def stage_options(args) -> dict[str, tuple[str, str]]:
    """Per two-stage option (STAGED), in recipe order: (its words in pair.json's "trained", its recipe flags)."""
    return {"opening": (f", on a loss that weighs the first {args.opening_tokens} response tokens "
                        f"{args.opening_weight:g}x (flythinker.training.opening_loss)",
                        f" --opening-tokens {args.opening_tokens} --opening-weight {args.opening_weight:g}"),
            "whiten": ("; its projection trained on whitened inputs (flythinker.training.whitened_projection)",
                       f" --whiten-batches {args.whiten_batches} --shrink {args.shrink:g}"),
            "truncated": (f"; the reasoner is SmolLM2's first {args.reasoner_layers} layers and final norm",
                          f" --reasoner-layers {args.reasoner_layers}"),
            "joint": (f"; stage 2 also trains the generator LoRA (lr {args.stage2_lora_lr:g})",
                      f" --stage2-lora-lr {args.stage2_lora_lr:g}"),
            "long": (f"; stage 2 runs {2 * args.fusion_steps} steps (two passes)", "")}


def _repo_relative(path: str | os.PathLike) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def ship(model, result: dict, args) -> None:
    """The shipped variant's trained tensors as the shipped pair: the generator's LoRA factors and the fusion, fp16."""
    from safetensors.torch import save

    from flythinker.hub import atomic_write_bytes, atomic_write_json

    folder = Path(args.ship_dir) if args.ship_dir else ROOT / "flythinker" / "pretrained" / SHIPPED
    staged = args.ship_variant in STAGED
    options = [described for option, described in stage_options(args).items() if uses(args.ship_variant, option)]
    tensors = {}
    for k, v in named(model).state_dict().items():  # frozen (c2, c3) or trained (c): the generator's LoRA factors
        if ".lora_A." in k or ".lora_B." in k:  # generator.<module>.lora_A.default.weight -> <module>.lora_A
            mod, ab = k.split(".lora_")
            tensors[f"{mod}.lora_{ab.split('.')[0]}"] = v
    tensors.update(model.fusion_state_dict())
    tensors = {k: v.detach().to(torch.float16 if v.dim() == 2 else torch.float32).contiguous()
               for k, v in tensors.items()}
    atomic_write_bytes(folder / "deltas.safetensors", save(tensors))
    info = {"base": "smollm2-135m-instruct",
            "fusion": {"fusion_lambda": args.lam, "projection": "zero", "latent_norm": "standardize"},
            "context": "split", "max_reasoner_tokens": args.max_reasoner_tokens,
            "lora": {"scaling": 2.0, "rank": args.rank, "targets": LORA_TARGETS, "part": "generator"},
            "trained": (f"generator LoRA rank {args.rank} on {len(LORA_TARGETS)} linear maps of every layer + "
                        "zero-initialised projection on standardised latents; reasoner frozen (SmolLM2 as shipped)"
                        + ("; two stages: the generator LoRA as variant a, then the fusion"
                           + ("" if uses(args.ship_variant, "joint") else " alone") if staged else "")
                        + "".join(text for text, _ in options)),
            "recipe": (f"python -m benchmarks.personalization_smollm2 --variants "
                       f"{'a,' if staged else ''}{args.ship_variant} --ship-variant {args.ship_variant} --ship "
                       f"--train-users {args.train_users} --steps {args.steps} --fusion-steps {args.fusion_steps} "
                       f"--batch {args.batch} --lr {args.lr} --fusion-lr {args.fusion_lr} --lam {args.lam} "
                       f"--calibrate-on {args.calibrate_on}" + "".join(flags for _, flags in options)),
            "measured": {"benchmark": _repo_relative(args.out),
                         "train_seconds": {v: result["variants"][v].get("seconds") for v in ("a", args.ship_variant)
                                           if v in result["variants"]}}}
    if uses(args.ship_variant, "truncated"):
        info["reasoner_layers"] = args.reasoner_layers
    atomic_write_json(folder / "pair.json", info)
    log(f"shipped {len(tensors)} tensors to {folder}")


def plot(result: dict, path: Path) -> None:
    """Generation accuracy per trait with 95% CIs per variant, and accuracy against training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("shipped",) + CURVED if "generation" in result["variants"].get(n, {})]
    labels = {"shipped": "generator as shipped", "a": "a: SFT, query only", "b": "b: SFT, history in context",
              "c": "c: flythinker split, joint", "d": "d: flythinker shared context, joint",
              "c2": "c2: flythinker split, a + fusion", "c3": "c3: c2 on the opening-weighted loss",
              "c4": "c4: c3 with whitened projection steps", "c5": "c5: c3 with a truncated reasoner",
              "c6": "c6: c3, generator LoRA too in stage 2 (shipped)", "c7": "c7: c3 with 2x stage-2 steps"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5.4))
    w = 0.8 / max(1, len(names))
    keys = GEN_TRAITS + ("rouge_l",)
    for i, n in enumerate(names):
        s = result["variants"][n]["generation"]
        means = [s[k]["mean"] for k in keys]
        err = [[m - s[k]["ci95"][0] for m, k in zip(means, keys)], [s[k]["ci95"][1] - m for m, k in zip(means, keys)]]
        ax.bar([j + i * w for j in range(len(keys))], means, w, yerr=err, capsize=3, label=labels.get(n, n))
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(keys))], keys)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"greedy replies, {result['data']['gen_users']} held-out users (95% CI)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    for n in CURVED:
        c = result["variants"].get(n, {}).get("curve")
        if c:
            ax2.plot([p["step"] for p in c], [p["strategy"] for p in c], marker="o", label=labels.get(n, n))
    ax2.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("training step")
    ax2.set_ylabel(f"strategy preference (likelihood), {result['args']['curve_users']} validation users")
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.suptitle("SmolLM2-135M-Instruct: generator LoRA alone vs flythinker (frozen reasoner, standardised fusion)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
