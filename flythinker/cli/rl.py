"""`flythinker rl`: GRPO fine-tuning of a pair through TRL with trait / length / judge rewards."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from flythinker.cli.common import CLIError
from flythinker.cli.options import lambda_float, nonneg_float, nonneg_int, positive_float, positive_int

HELP = "GRPO fine-tuning (TRL) with persona-empathy trait, length and empathy-judge rewards"
DESCRIPTION = (
    "Fine-tune a FlyThinker pair with GRPO (TRL's GRPOTrainer; needs the `rl` extra). Data: persona records (any "
    "layout `flythinker train` reads) or the bundled persona-empathy. Split context by default: the reasoner reads "
    "the user's history, the generator the query. Rewards (repeatable, NAME[:WEIGHT]): trait (rule-based, the "
    "users' hidden traits), length (PERM's length penalty), perm / peregrm (empathy judges). The mean reward per "
    "step is logged to OUT/reward_curve.jsonl; the trained pair (or its LoRA adapters) is saved to OUT.")

REWARDS = ("trait", "length", "perm", "peregrm")


def _reward_spec(text: str) -> tuple[str, float]:
    name, _, w = text.partition(":")
    if name not in REWARDS:
        raise argparse.ArgumentTypeError(f"unknown reward {name!r}; choose from {', '.join(REWARDS)}")
    try:
        weight = float(w) if w else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"reward weight must be a number, got {w!r}") from None
    if not math.isfinite(weight):  # nan / inf: every reward NaN, or the update a no-op
        raise argparse.ArgumentTypeError(f"reward weight must be a finite number, got {w!r}")
    return name, weight


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="persona-empathy", help="persona records file, or 'persona-empathy'")
    p.add_argument("--generator", default="smollm2-135m-instruct", help="short name or HF folder")
    p.add_argument("--reasoner", default=None, help="short name or HF folder (default: a copy of the generator)")
    p.add_argument("--context", choices=("split", "shared"), default="split")
    p.add_argument("--fusion-lambda", type=lambda_float, default=0.1)
    p.add_argument("--reward", type=_reward_spec, action="append", default=None,
                   help="NAME[:WEIGHT], repeatable (default: trait)")
    p.add_argument("--judge-model", default="smollm2-135m-instruct", help="judge rewards: local model or served name")
    p.add_argument("--judge-base-url", default=None, help="judge rewards: an OpenAI-compatible endpoint")
    p.add_argument("--rules", choices=("authors", "strict"), default="strict",
                   help="judge rewards: scoring rules (authors = the rubric's repository, with its judge sampling "
                        "and substitutes; strict = checked scores, a failed completion gets its group's mean)")
    p.add_argument("--length-limit", type=positive_int, default=768)
    p.add_argument("--length-coef", type=positive_float, default=0.001)
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument("--group", type=positive_int, default=4, help="completions per prompt (num_generations)")
    p.add_argument("--batch", type=positive_int, default=8, help="completions per device step (multiple of group)")
    p.add_argument("--grad-accum", type=positive_int, default=1)
    p.add_argument("--lr", type=positive_float, default=5e-5)
    p.add_argument("--beta", type=nonneg_float, default=0.0, help="KL weight (> 0 uses a reference model)")
    p.add_argument("--max-completion", type=positive_int, default=64)
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--lora", action="store_true", help="LoRA (r=8, q/v projections of both models)")
    p.add_argument("--lora-r", type=positive_int, default=8)
    p.add_argument("--lora-models", choices=("both", "generator"), default="both",
                   help="with --lora: the models that get adapters; 'generator' keeps the reasoner frozen, so a "
                        "group's shared reasoner prompt is computed once (--reuse-reasoner-prompts)")
    p.add_argument("--reuse-reasoner-prompts", choices=("auto", "on", "off"), default="auto",
                   help="run each distinct reasoner prompt of a batch through the reasoner once and reuse it for "
                        "the group's completions and every log-prob forward; auto: where valid (split context, "
                        "a frozen reasoner: --lora --lora-models generator)")
    p.add_argument("--max-reasoner-tokens", type=positive_int, default=512)
    p.add_argument("--limit", type=positive_int, default=None, help="use the first N training records")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--out", required=True, help="output folder (an existing run is refused unless --resume or "
                                                 "--overwrite)")
    p.add_argument("--save-steps", type=nonneg_int, default=0,
                   help="also checkpoint every N steps under OUT/trainer (0: none); --resume continues from them")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from its newest complete checkpoint (OUT/trainer/checkpoint-N)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in OUT (its model, reward curve and checkpoints are removed first)")


def _records(args: argparse.Namespace):
    """The training records, checked before any model loads: none is an error, and so is a trait reward on
    records without hidden traits (it would score every completion 0)."""
    from flythinker.persona import load_dataset, load_records

    spec = args.data
    if spec == "persona-empathy":
        records = load_dataset("persona-empathy", "train")
    elif not Path(spec).is_file():
        raise CLIError(f"--data: no such file: {spec}")
    else:
        records = load_records(spec)  # RecordError / JsonFileError: one line
    records = records[: args.limit] if args.limit else records
    if not records:
        raise CLIError(f"--data {spec}: no records to train on")
    if any(name == "trait" for name, _ in args.reward or [("trait", 1.0)]):
        bare = sum(not rec.persona.traits for rec in records)
        if bare:
            raise CLIError(f"--data {spec}: {bare} of {len(records)} records have no hidden traits (persona.traits) "
                           "for the trait reward: choose another --reward (length, perm, peregrm)")
    return records


def _reward_funcs(args: argparse.Namespace):
    from flythinker.rl import LengthPenalty, TraitReward, judge_reward

    funcs, weights = [], []
    for name, w in args.reward or [("trait", 1.0)]:
        if name == "trait":
            f = TraitReward()
        elif name == "length":
            f = LengthPenalty(args.length_limit, args.length_coef)
        else:
            f = judge_reward(name, args.judge_model, base_url=args.judge_base_url, rules=args.rules)
        funcs.append(f)
        weights.append(w)
    return funcs, weights


def _curve_callback(path: Path):
    from transformers import TrainerCallback

    class Curve(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                with open(path, "a") as fh:
                    fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return Curve()


OWNED = ("model", "reward_curve.jsonl", "trainer")  # what a run writes into --out (removed by --overwrite)


def _start(out: Path, args: argparse.Namespace) -> str | None:
    """Prepare OUT (held by the caller's run_folder lock) for this run; returns the checkpoint to resume or None.
    --overwrite removes the old run's outputs; --resume keeps the reward curve up to the checkpoint's step."""
    import shutil

    from flythinker.checkpoint import latest_checkpoint

    curve = out / "reward_curve.jsonl"
    if args.overwrite:
        for name in OWNED:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        return None
    if not args.resume:
        return None
    path, skipped = latest_checkpoint(out / "trainer")  # CheckpointError: a one-line user error
    for bad, why in skipped:
        print(f"warning: not resuming from {bad.name}: {why}", file=sys.stderr)
    step = int(path.name.rsplit("-", 1)[1])
    if curve.is_file():  # the killed run's lines after the checkpoint are logged again by the resumed run
        from flythinker.hub import atomic_write_bytes

        kept = [ln for ln in curve.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write_bytes(curve, "".join(ln + "\n" for ln in kept).encode())
    print(f"resuming from {path}", file=sys.stderr)
    return str(path)


def _config(out: Path, args: argparse.Namespace, weights: list[float]):
    import torch

    from flythinker.rl.trainer import GRPOConfig

    return GRPOConfig(output_dir=str(out / "trainer"), per_device_train_batch_size=args.batch,
                      num_generations=args.group, gradient_accumulation_steps=args.grad_accum,
                      max_completion_length=args.max_completion, max_steps=args.steps, learning_rate=args.lr,
                      beta=args.beta, temperature=args.temperature, reward_weights=weights, logging_steps=1,
                      report_to=[], save_strategy="steps" if args.save_steps else "no",
                      save_steps=max(args.save_steps, 1), seed=args.seed, gradient_checkpointing=False,
                      use_cpu=not torch.cuda.is_available(), bf16=False)


def run(args: argparse.Namespace) -> int:
    try:
        from datasets import Dataset

        from flythinker.rl.trainer import FlyThinkerGRPOTrainer
    except ImportError as exc:
        raise CLIError(f"{exc} (install the extra: pip install 'flythinker[rl]')") from exc
    from flythinker.run_folder import run_folder

    if args.batch % args.group:
        raise CLIError(f"--batch {args.batch} must be a multiple of --group {args.group}")
    if args.lora_models != "both" and not args.lora:
        raise CLIError("--lora-models needs --lora")
    records = _records(args)  # before the folder is touched and any model loads
    with run_folder(args.out, resume=args.resume, overwrite=args.overwrite) as out:
        resume = _start(out, args)
        trainer, tok = _trainer(args, records, out, FlyThinkerGRPOTrainer, Dataset)
        _train(trainer, resume)
        if trainer.prompt_reuse is not None:
            st = trainer.prompt_reuse.stats
            print(f"reasoner prompt reuse: {st.prompt_tokens} prompt tokens computed, {st.reused_tokens} reused "
                  f"over {st.forwards} forwards; bypassed: {st.bypassed or 'none'}", file=sys.stderr)
        _check_judges(trainer)
        _save(trainer, tok, out)
    return 0


def _trainer(args, records, out: Path, trainer_cls, dataset_cls):
    from flythinker.cli.common import load_pair
    from flythinker.rl import grpo_rows

    pair, tok = load_pair(args.generator, args.reasoner, fusion_lambda=args.fusion_lambda, parallel="off")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    rows = grpo_rows(records, tok, mode=args.context, max_reasoner_tokens=args.max_reasoner_tokens)
    funcs, weights = _reward_funcs(args)
    peft = None
    if args.lora:
        from peft import LoraConfig

        targets = (["q_proj", "v_proj"] if args.lora_models == "both"
                   else r".*\.generator\..*\.(q_proj|v_proj)")  # a regex: the generator's projections only
        peft = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=targets)
    reuse = {"auto": None, "on": True, "off": False}[args.reuse_reasoner_prompts]
    try:
        trainer = trainer_cls(model=pair, reward_funcs=funcs, args=_config(out, args, weights),
                              train_dataset=dataset_cls.from_list(rows), processing_class=tok, peft_config=peft,
                              callbacks=[_curve_callback(out / "reward_curve.jsonl")], reuse_reasoner_prompts=reuse)
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from exc
    print(f"reasoner prompt reuse: {'on' if trainer.reasoner_reuse else 'off'} ({trainer.reasoner_reuse_reason})",
          file=sys.stderr)
    return trainer, tok


def _train(trainer, resume: str | None) -> None:
    from flythinker.empathy import JudgeBackendError

    try:
        trainer.train(resume_from_checkpoint=resume)
    except JudgeBackendError as exc:  # the judge endpoint failed mid-run: one line (checkpoints so far are kept)
        raise CLIError(str(exc)) from None


def _check_judges(trainer) -> None:
    """Report each judge reward's failures; a judge that scored nothing gave no training signal (TRL sums a
    missing reward as 0): an error, not a model saved as if trained on it."""
    from flythinker.rl import JudgeReward

    for f in trainer.reward_funcs:
        if not isinstance(f, JudgeReward):
            continue
        rep = f.judge.report()
        items, lost = rep.get("items", 0), rep.get("items_without_reward", 0)
        print(f"{f.__name__}: {items} completions judged, {lost} without a reward "
              f"({', '.join(f'{k} {v}' for k, v in sorted(rep.items()) if k.endswith('failures') and v)})",
              file=sys.stderr)
        if items and lost == items:
            raise CLIError(f"{f.__name__}: the judge scored none of the {items} completions (see its failures "
                           "above), so the run learned nothing from it; use a judge that answers with scores "
                           "(--judge-base-url, another --judge-model); the model is not saved")


def _save(trainer, tok, out: Path) -> None:
    """The trained pair (or adapters) + tokenizer into OUT/model, in one atomic move (a run killed while saving
    leaves the previous model or none, never a mix)."""
    from flythinker.hub import atomic_directory

    with atomic_directory(out / "model") as tmp:
        trainer.model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    print(f"reward curve: {out / 'reward_curve.jsonl'}; model: {out / 'model'}", file=sys.stderr)
