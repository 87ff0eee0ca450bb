"""`flythinker rl`: GRPO fine-tuning of a pair through TRL with trait / length / judge rewards."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flythinker.cli.common import CLIError, positive_float, positive_int

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
    return name, weight


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="persona-empathy", help="persona records file, or 'persona-empathy'")
    p.add_argument("--generator", default="smollm2-135m-instruct", help="short name or HF folder")
    p.add_argument("--reasoner", default=None, help="short name or HF folder (default: a copy of the generator)")
    p.add_argument("--context", choices=("split", "shared"), default="split")
    p.add_argument("--fusion-lambda", type=float, default=0.1)
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
    p.add_argument("--beta", type=float, default=0.0, help="KL weight (> 0 uses a reference model)")
    p.add_argument("--max-completion", type=positive_int, default=64)
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--lora", action="store_true", help="LoRA (r=8, q/v projections of both models)")
    p.add_argument("--lora-r", type=positive_int, default=8)
    p.add_argument("--max-reasoner-tokens", type=positive_int, default=512)
    p.add_argument("--limit", type=positive_int, default=None, help="use the first N training records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")


def _records(spec: str):
    from flythinker.persona import load_dataset, load_records

    if spec == "persona-empathy":
        return load_dataset("persona-empathy", "train")
    if not Path(spec).is_file():
        raise CLIError(f"--data: no such file: {spec}")
    return load_records(spec)


def _reward_funcs(args: argparse.Namespace):
    from flythinker.rl import JudgeReward, LengthPenalty, TraitReward

    funcs, weights = [], []
    for name, w in args.reward or [("trait", 1.0)]:
        if name == "trait":
            f = TraitReward()
        elif name == "length":
            f = LengthPenalty(args.length_limit, args.length_coef)
        else:
            from flythinker.empathy import EmpathyJudge, HFJudgeBackend, OpenAIJudgeBackend, get_rubric

            backend = (OpenAIJudgeBackend(args.judge_model, base_url=args.judge_base_url) if args.judge_base_url
                       else HFJudgeBackend(args.judge_model))
            mode = "generate" if args.judge_base_url else "expected"
            f = JudgeReward(EmpathyJudge(get_rubric(name), backend, mode=mode, rules=args.rules, role="training"))
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


def run(args: argparse.Namespace) -> int:
    try:
        from datasets import Dataset

        from flythinker.rl.trainer import FlyThinkerGRPOTrainer, GRPOConfig
    except ImportError as exc:
        raise CLIError(f"{exc} (install the extra: pip install 'flythinker[rl]')") from exc
    from flythinker.cli.common import load_pair
    from flythinker.rl import grpo_rows

    if args.batch % args.group:
        raise CLIError(f"--batch {args.batch} must be a multiple of --group {args.group}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = _records(args.data)[: args.limit] if args.limit else _records(args.data)
    pair, tok = load_pair(args.generator, args.reasoner, fusion_lambda=args.fusion_lambda, parallel="off")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    rows = grpo_rows(records, tok, mode=args.context, max_reasoner_tokens=args.max_reasoner_tokens)
    funcs, weights = _reward_funcs(args)
    cfg = GRPOConfig(output_dir=str(out / "trainer"), per_device_train_batch_size=args.batch,
                     num_generations=args.group, gradient_accumulation_steps=args.grad_accum,
                     max_completion_length=args.max_completion, max_steps=args.steps, learning_rate=args.lr,
                     beta=args.beta, temperature=args.temperature, reward_weights=weights, logging_steps=1,
                     report_to=[], save_strategy="no", seed=args.seed, gradient_checkpointing=False,
                     use_cpu=not __import__("torch").cuda.is_available(), bf16=False)
    peft = None
    if args.lora:
        from peft import LoraConfig

        peft = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=["q_proj", "v_proj"])
    curve = out / "reward_curve.jsonl"
    curve.unlink(missing_ok=True)
    try:
        trainer = FlyThinkerGRPOTrainer(model=pair, reward_funcs=funcs, args=cfg, train_dataset=Dataset.from_list(rows),
                                        processing_class=tok, peft_config=peft, callbacks=[_curve_callback(curve)])
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from exc
    trainer.train()
    trainer.model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    print(f"reward curve: {curve}; model: {out / 'model'}", file=sys.stderr)
    return 0
