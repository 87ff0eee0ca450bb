"""`flythinker train`: single-pass joint training of a pair with HF `Trainer`; saves a checkpoint that
`flythinker generate --model` loads.

The same code runs single-process, under `torchrun --nproc_per_node N` (DDP; gloo on CPU, nccl on CUDA) and under
`accelerate launch` (`-m flythinker.cli train ...`, or the alias `-m flythinker.training.train ...`):
HF `Trainer` reads the launcher's environment. Only the main process writes files and logs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from flythinker.cli.common import (
    CLIError,
    add_fusion_arguments,
    checkpoint_type,
    fusion_options,
    load_checkpoint,
    load_pair,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    ratio_float,
    reply_records,
    sequence_int,
)

if TYPE_CHECKING:
    from flythinker.training.recipe import PairRecipe

HELP = "fine-tune a pair jointly on (prompt, response) data"
DESCRIPTION = ("Single-pass joint training of a generator/reasoner pair; saves a checkpoint that "
               "`flythinker generate --model` loads.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `flythinker train` options to `parser`."""
    from flythinker.options import LOSS_IMPLS

    m = parser.add_argument_group("model pair")
    m.add_argument("--generator", help="generator: a short name (e.g. smollm2-135m-instruct) or a local HF folder")
    m.add_argument("--reasoner", help="reasoner: a short name or a local HF folder sharing the generator's "
                                      "tokenizer (default: a second copy of the generator)")
    m.add_argument("--model", help="continue from a flythinker checkpoint folder instead of --generator/--reasoner")
    add_fusion_arguments(m, lambda_help="fusion weight lambda (default: 0.5, or the checkpoint's)")
    m.add_argument("--loss-impl", choices=LOSS_IMPLS, default=None, help="LM loss implementation")

    d = parser.add_argument_group("data")
    d.add_argument("--data", required=True, help="training file: JSONL of prompt/response, generator_prompt/"
                   "reasoner_prompt/response, messages, or persona records; with --recipe also a bundled data set "
                   "as bundled:NAME[@VERSION]:SPLIT, e.g. bundled:persona-empathy@2:train")
    d.add_argument("--eval-data", help="held-out file (same formats); its loss is reported after training")
    d.add_argument("--context", choices=("split", "shared"), default="split",
                   help="persona records only: split (reasoner reads the persona) or shared context")
    d.add_argument("--max-length", type=sequence_int, default=None,
                   help="cap on generator sequence tokens (>= 2: one prompt and one response token)")
    d.add_argument("--reasoner-max-length", type=positive_int, default=None,
                   help="cap on reasoner sequence tokens")
    d.add_argument("--chat-template", choices=("auto", "on", "off"), default="auto",
                   help="wrap string prompts in the tokenizer's chat template (auto: if it has one)")
    d.add_argument("--no-eos", action="store_true", help="do not append EOS to pair responses")
    d.add_argument("--padding-side", choices=("left", "right"), default="left")

    t = parser.add_argument_group("training")
    t.add_argument("--output-dir", required=True, help="where checkpoints and the final model are written")
    t.add_argument("--epochs", type=positive_float, default=1.0, help="epochs (default %(default)s)")
    t.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    t.add_argument("--lr", type=positive_float, default=1e-5, help="peak learning rate (default %(default)s)")
    t.add_argument("--weight-decay", type=nonneg_float, default=0.0, help="AdamW weight decay (>= 0)")
    t.add_argument("--warmup-ratio", type=ratio_float, default=0.0,
                   help="fraction of steps with linear warmup, in [0, 1)")
    t.add_argument("--batch-size", type=positive_int, default=1, help="per-process batch size")
    t.add_argument("--grad-accum", type=positive_int, default=1, help="gradient accumulation steps")
    t.add_argument("--train", default="both",
                   help="what trains: both (generator+reasoner+projection, default) or a comma list of "
                        "generator, reasoner, projection")
    t.add_argument("--lora", action="store_true", help="LoRA adapters instead of full fine-tuning")
    t.add_argument("--lora-r", type=positive_int, default=8)
    t.add_argument("--lora-alpha", type=positive_int, default=16)
    t.add_argument("--lora-dropout", type=ratio_float, default=0.0, help="LoRA dropout, in [0, 1)")
    t.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", help="comma list of module names")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    t.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast dtype; auto = bf16/fp16 on CUDA, fp32 on CPU")
    t.add_argument("--logging-steps", type=positive_int, default=10, help="log the loss every N steps")
    t.add_argument("--save-steps", type=nonneg_int, default=0,
                   help="also checkpoint every N steps (0: only at the end); --resume continues from them")
    t.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue an interrupted run: from its newest complete checkpoint-<step> in --output-dir "
                        "(or from the CHECKPOINT folder given); same model, data and options as the first run")
    t.add_argument("--overwrite", action="store_true",
                   help="start over in an --output-dir that already holds a run (its checkpoint-<step> folders "
                        "and train_log.jsonl are deleted, its model replaced); without it a folder holding "
                        "anything is refused unless --resume")
    t.add_argument("--seed", type=nonneg_int, default=None,
                   help="data order and initialisation (default: 42; with --recipe, the recipe's own seed)")
    t.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")

    r = parser.add_argument_group("named recipe (persona records; flythinker.training.recipe)")
    r.add_argument("--recipe", default=None, help="train a pretrained pair with a named recipe instead of one joint "
                   "stage: persona-pair (zero projection on calibrated latents, generator LoRA, then fusion on the "
                   "opening-weighted loss)")
    r.add_argument("--stage1-steps", type=nonneg_int, default=None, help="recipe: generator-LoRA steps")
    r.add_argument("--stage2-steps", type=positive_int, default=None, help="recipe: fusion steps")
    r.add_argument("--users", type=positive_int, default=None,
                   help="recipe: train on the first N users of --data (file order)")
    r.add_argument("--per-user", type=positive_int, default=None,
                   help="recipe: the first K records of each user (default: all)")
    r.add_argument("--ship-dir", default=None, help="recipe: also write the pair in the shipped-pair format "
                   "(pair.json + deltas.safetensors) here")
    r.add_argument("--reasoner-lora-rank", type=positive_int, default=None,
                   help="recipe: stage 2 also trains a zero-initialised LoRA of this rank on the reasoner's top "
                        "layers (the pair still starts at its generator); the pair is then saved merged only, "
                        "--ship-dir is refused (default: none, the reasoner stays frozen and its latents are cached)")
    r.add_argument("--reasoner-lora-layers", type=positive_int, default=None,
                   help="recipe, with --reasoner-lora-rank: how many of the reasoner's top layers get the LoRA "
                        "(default: 8; all of them when the reasoner has fewer)")
    r.add_argument("--reasoner-lr", type=positive_float, default=None,
                   help="recipe, with --reasoner-lora-rank: the reasoner LoRA's peak learning rate in stage 2 "
                        "(default: 1e-3)")


# options of the named-recipe group that mean nothing to a joint run
RECIPE_ONLY = ("stage1_steps", "stage2_steps", "users", "per_user", "ship_dir", "reasoner_lora_rank",
               "reasoner_lora_layers", "reasoner_lr")
# recipe options that only mean something with a reasoner LoRA
REASONER_LORA_ONLY = ("reasoner_lora_layers", "reasoner_lr")
# recipe options -> PairRecipe fields of the same name
RECIPE_FIELDS = ("stage1_steps", "stage2_steps", "reasoner_lora_rank", "reasoner_lora_layers", "reasoner_lr")


def _log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"flythinker train: {msg}", file=sys.stderr, flush=True)


def _load(args: argparse.Namespace):
    """(model, tokenizer) from --model (a flythinker checkpoint) or --generator [--reasoner]."""
    fusion = fusion_options(args, "fusion_lambda", "norm_target", "projection", "loss_impl")
    if args.model:
        if args.generator or args.reasoner:
            raise CLIError("give either --model (a flythinker checkpoint) or --generator and --reasoner, not both")
        if checkpoint_type(args.model) != "flythinker":
            raise CLIError(f"--model {args.model}: not a flythinker checkpoint (use --generator/--reasoner for "
                           "plain models)")
        return load_checkpoint(args.model, **fusion)
    if not args.generator:
        raise CLIError("need --generator [--reasoner] (or --model with a flythinker checkpoint)")
    return load_pair(args.generator, args.reasoner, **fusion)


def _datasets(args: argparse.Namespace, tokenizer):
    from flythinker.training.data import DataError, load_examples

    out = []
    for path in (args.data, args.eval_data):
        if path is None:
            out.append((None, None))
            continue
        try:
            out.append(load_examples(path, tokenizer=tokenizer, context=args.context,
                                     max_reasoner_tokens=args.reasoner_max_length,
                                     max_generator_tokens=args.max_length))
        except DataError as e:
            raise CLIError(str(e)) from None
    return out


def _check_inputs(args: argparse.Namespace):
    """Fail before any model loads: data files, parts, precision, step count. Returns (parts, autocast dtype)."""
    import torch

    from flythinker.training.trainable import parse_parts, resolve_precision

    for path in (args.data, args.eval_data):
        if path is not None and not Path(path).is_file():
            raise CLIError(f"data file not found: {path}")
    try:
        parts = parse_parts(args.train)
        dtype = resolve_precision(args.precision, "cuda" if torch.cuda.is_available() else "cpu")
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.max_steps == 0 or args.max_steps < -1:
        raise CLIError(f"--max-steps must be positive (or -1 to use --epochs), got {args.max_steps}")
    if args.overwrite and args.resume is not None:
        raise CLIError("--overwrite and --resume contradict each other: pick one")
    out = Path(args.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output-dir {args.output_dir} is an existing file, not a folder")
    return parts, dtype


def _check_output_dir(args: argparse.Namespace) -> None:
    """With --resume --output-dir must hold a checkpoint to resume; with --overwrite the old run's checkpoints and
    log go. Called with the folder locked (flythinker.run_folder). Sets `args.resume` to the checkpoint folder (a
    str) or None."""
    from flythinker.checkpoint import check_resumable, latest_checkpoint

    out = Path(args.output_dir).expanduser()
    if args.resume is None:
        _refuse_old_checkpoints(out, args.overwrite)
        return
    if args.resume is True:
        path, skipped = latest_checkpoint(out)  # CheckpointError: a one-line user error
        for bad, why in skipped:
            _log(f"warning: not resuming from {bad.name}: {why}")
    else:
        path = check_resumable(Path(args.resume).expanduser())
    args.resume = str(path)
    _log(f"resuming from {path}")


def _refuse_old_checkpoints(out: Path, overwrite: bool) -> None:
    """A fresh run into a folder with checkpoints: CLIError suggesting --resume, or (--overwrite) delete them."""
    import shutil

    from flythinker.checkpoint import training_checkpoints

    old = training_checkpoints(out)
    if old and not overwrite:
        raise CLIError(f"--output-dir {out} already holds {len(old)} checkpoint(s) (newest {old[-1].name}): "
                       "pass --resume to continue that run, or --overwrite to start over")
    for path in old:
        shutil.rmtree(path)
        _log(f"--overwrite: removed {path}")
    if overwrite:
        (out / "train_log.jsonl").unlink(missing_ok=True)


def _position_caps(model, args: argparse.Namespace) -> None:
    """No sequence trains past a model's `max_position_embeddings`: a cap above it is refused, no cap becomes
    it (longer examples are then cut, counted and warned about by the collator; persona views drop history)."""
    for flag, attr, part in (("--max-length", "max_length", "generator"),
                             ("--reasoner-max-length", "reasoner_max_length", "reasoner")):
        limit = getattr(getattr(model.config, part, None), "max_position_embeddings", None)
        if not isinstance(limit, int):
            continue
        asked = getattr(args, attr)
        if asked is not None and asked > limit:
            raise CLIError(f"{flag} {asked} is over the {part}'s max_position_embeddings={limit}")
        if asked is None:
            setattr(args, attr, limit)


def _prepare_model(model, parts: frozenset[str], args: argparse.Namespace) -> None:
    """Freeze what does not train, inject LoRA, switch on gradient checkpointing (in place)."""
    from flythinker.training.trainable import apply_lora, enable_gradient_checkpointing, set_trainable

    if model.config.fusion_lambda == 0 and "reasoner" in parts:
        parts = parts - {"reasoner"}  # lambda = 0: the reasoner cannot affect the loss; train nothing there
        _log("lambda = 0: the reasoner gets no gradient, so it is frozen")
        if not parts:
            raise CLIError("lambda = 0 with --train reasoner: nothing can learn")
    try:
        if args.lora:
            if not parts - {"projection"}:
                raise CLIError("--lora needs the generator and/or the reasoner in --train")
            apply_lora(model, parts - {"projection"}, r=args.lora_r, alpha=args.lora_alpha,
                       dropout=args.lora_dropout, target_modules=[t for t in args.lora_targets.split(",") if t])
        counts = set_trainable(model, parts)
    except ValueError as e:
        raise CLIError(str(e)) from None
    _log("trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)


def _collator(args: argparse.Namespace, tokenizer, kind: str, train_ex: list):
    from flythinker.training.collator import FlyThinkerCollator

    chat = {"on": True, "off": False}.get(args.chat_template, getattr(tokenizer, "chat_template", None) is not None)
    collator = FlyThinkerCollator(tokenizer=tokenizer, padding_side=args.padding_side, chat_template=chat,
                                  add_eos=not args.no_eos and kind == "pairs", max_length=args.max_length,
                                  reasoner_max_length=args.reasoner_max_length)
    try:  # fail early, in one line, on data the collator cannot use (a copy: its cuts are not the run's)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataclasses.replace(collator)(train_ex[:1])
    except (TypeError, ValueError) as e:
        raise CLIError(f"{args.data}: {e}") from None
    return collator


def _training_arguments(args: argparse.Namespace, dtype):
    import torch
    from transformers import TrainingArguments

    cpu = not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(args.output_dir),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=float(args.warmup_ratio),  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type="linear",
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=max(args.save_steps, 1),
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        seed=_seed(args),
        data_seed=_seed(args),
        remove_unused_columns=False,  # the collator needs the raw prompt/response fields
        ddp_find_unused_parameters=False,  # every trainable parameter reaches the loss (see set_trainable)
        dataloader_num_workers=0,
        disable_tqdm=args.no_progress,
        report_to="none",
    )


def run(args: argparse.Namespace) -> int:
    """Run `flythinker train`; returns the exit status."""
    import logging

    from flythinker.run_folder import RunFolderError, run_folder

    logging.getLogger("transformers").setLevel(logging.WARNING)  # Trainer's warnings stay visible
    if args.recipe is None:
        given = [f"--{k.replace('_', '-')}" for k in RECIPE_ONLY if getattr(args, k) is not None]
        if given or args.data.startswith("bundled:"):
            raise CLIError(f"{', '.join(given) or '--data bundled:...'} only applies with --recipe")
    else:
        _check_recipe_options(args)  # before the run folder is touched
        try:
            with run_folder(args.output_dir, resume=False, overwrite=args.overwrite):
                return run_named_recipe(args)
        except RunFolderError as exc:
            raise CLIError(f"--output-dir {exc}") from None
    parts, dtype = _check_inputs(args)
    try:
        held = run_folder(args.output_dir, resume=args.resume is not None, overwrite=args.overwrite)
        with held:  # one writer per --output-dir; a folder holding anything needs --resume or --overwrite
            return _run_locked(args, parts, dtype)
    except RunFolderError as exc:
        raise CLIError(f"--output-dir {exc}") from None


def _run_locked(args: argparse.Namespace, parts, dtype) -> int:
    from transformers import set_seed

    from flythinker.training.trainer import FlyThinkerTrainer, JsonlLogCallback

    _check_output_dir(args)
    set_seed(_seed(args))
    model, tokenizer = _load(args)
    _position_caps(model, args)
    (train_ex, kind), (eval_ex, _) = _datasets(args, tokenizer)
    if eval_ex is not None and ("reasoner_prompt" in eval_ex[0]) != ("reasoner_prompt" in train_ex[0]):
        raise CLIError("--data and --eval-data must both be split context or both shared context")
    _prepare_model(model, parts, args)
    collator = _collator(args, tokenizer, kind, train_ex)
    out = Path(args.output_dir)
    targs = _training_arguments(args, dtype)
    trainer = FlyThinkerTrainer(model=model, args=targs, train_dataset=train_ex, eval_dataset=eval_ex,
                                data_collator=collator, processing_class=tokenizer,
                                callbacks=[JsonlLogCallback(out / "train_log.jsonl")])
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=args.resume)
    _log(f"{result.global_step} steps in {time.perf_counter() - start:.1f}s, mean train loss "
         f"{result.training_loss:.4f}")
    cut = collator.truncation
    if cut["examples"]:
        _log(f"truncated {cut['examples']} examples to fit the caps (tokens cut: prompts {cut['prompt_tokens']}, "
             f"reasoner prompts {cut['reasoner_prompt_tokens']}, responses {cut['response_tokens']})")
    if eval_ex is not None:
        _log(f"held-out loss {trainer.evaluate()['eval_loss']:.4f}")
    save_final(trainer, out, targs)
    if trainer.is_world_process_zero():
        _log(f"saved checkpoint to {out} (load with FlyThinkerForCausalLM.from_pretrained / flythinker generate)")
    return 0


def save_final(trainer, out: Path, targs) -> None:
    """The final model into `out`: merged weights (LoRA folded in) + tokenizer + training_args.json, staged in a
    temporary folder and moved in file by file with config.json last, so a run killed while saving leaves no
    folder that loads as complete (no config.json yet, or the previous complete model's)."""
    import os

    from flythinker.hub import staging_directory

    with staging_directory(out / "model") as tmp:
        trainer.save_model(str(tmp))  # every process calls it; only the main one writes
        if not trainer.is_world_process_zero():
            return
        # Trainer pickles its arguments next to the weights; the final folder stays pickle-free (JSON instead)
        (tmp / "training_args.bin").unlink(missing_ok=True)
        (tmp / "training_args.json").write_text(targs.to_json_string())
        files = sorted((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: p.name == "config.json")
        for file in files:
            dest = out / file.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, dest)


def _seed(args: argparse.Namespace) -> int:
    return 42 if args.seed is None else args.seed


def _recipe_records(args: argparse.Namespace):
    """The --data persona records (each with a reference reply; --users / --per-user applied), or CLIError."""
    from flythinker.training.recipe import select_per_user

    select = None
    if args.users is not None or args.per_user is not None:
        def select(records):
            return select_per_user(records, args.per_user or len(records), args.users or len(records))
    return reply_records(args.data, "--recipe", select)


def _check_recipe_options(args: argparse.Namespace) -> None:
    """A known --recipe; the reasoner-LoRA options only with --reasoner-lora-rank, and not with --ship-dir (the
    shipped-pair format carries the generator's LoRA only): refused before anything trains."""
    from flythinker.training.recipe import RECIPES

    if args.recipe not in RECIPES:
        raise CLIError(f"unknown --recipe {args.recipe!r}; known: {', '.join(sorted(RECIPES))}")
    if args.reasoner_lora_rank is None:
        given = [f"--{k.replace('_', '-')}" for k in REASONER_LORA_ONLY if getattr(args, k) is not None]
        if given:
            raise CLIError(f"{', '.join(given)} only applies with --reasoner-lora-rank")
    elif args.ship_dir:
        raise CLIError("--ship-dir cannot hold a pair trained with --reasoner-lora-rank: the shipped-pair format "
                       "carries the generator's LoRA only; such a pair is saved merged into --output-dir/model")


def _recipe_of(args: argparse.Namespace) -> PairRecipe:
    """The named recipe with the command line's changes (--seed, steps, lambda, reasoner budget, reasoner LoRA)."""
    from flythinker.training.recipe import RECIPES

    changes = {k: getattr(args, k) for k in ("seed", *RECIPE_FIELDS) if getattr(args, k) is not None}
    if args.fusion_lambda is not None:
        changes["fusion_lambda"] = args.fusion_lambda
    if args.reasoner_max_length is not None:
        changes["max_reasoner_tokens"] = args.reasoner_max_length
    try:
        return RECIPES[args.recipe].replace(**changes)
    except ValueError as e:
        raise CLIError(f"--recipe {args.recipe}: {e}") from None


def run_named_recipe(args: argparse.Namespace) -> int:
    """`flythinker train --recipe NAME`: the named recipe on persona records (flythinker.training.recipe); saves
    the merged pair into --output-dir/model (and the shipped-pair format into --ship-dir)."""
    from flythinker.training.recipe import run_recipe, save_pair_deltas
    from flythinker.training.trainable import merge_lora, save_merged

    _check_recipe_options(args)
    if args.model or not args.generator:
        raise CLIError("--recipe trains a new pair: give --generator [--reasoner], not --model")
    if args.resume is not None:
        raise CLIError("--recipe runs are not resumable yet (each stage is short): start over")
    out = Path(args.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output-dir {args.output_dir} is an existing file, not a folder")
    recipe = _recipe_of(args)
    records = _recipe_records(args)
    generator = args.generator
    model, tok, report = run_recipe(generator, args.reasoner or generator, records, recipe, output_dir=out,
                                    log=_log)
    if args.ship_dir:
        save_pair_deltas(model, Path(args.ship_dir), recipe, base=generator,
                         info={"trained": f"flythinker train --recipe {args.recipe}", "records": len(records),
                               "train_seconds": report["seconds"]})
        _log(f"wrote the shipped-pair format to {args.ship_dir}")
    merge_lora(model)
    save_merged(model, out / "model", tokenizer=tok)
    _log(f"recipe {args.recipe}: {len(records)} records, {report['seconds']:.0f} s; saved {out / 'model'}")
    return 0
