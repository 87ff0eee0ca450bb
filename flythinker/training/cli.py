"""`flythinker train`: arguments (`add_train_arguments`) and the run (`run_train`).

The same code runs single-process, under `torchrun --nproc_per_node N` (DDP; gloo on CPU, nccl on CUDA) and under
`accelerate launch`: HF `Trainer` reads the launcher's environment. Only the main process writes files and logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """Bad input (missing file, malformed data, incompatible pair, bad option): reported in one line."""


def _lambda(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 100], got {text!r}") from None
    if not 0.0 <= v <= 100.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 100], got {text!r}")
    return v


def _positive(cast):
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return v

    parse.__name__ = f"positive {cast.__name__}"
    return parse


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `flythinker train` options to `parser` (a subcommand parser or a standalone one)."""
    m = parser.add_argument_group("model pair")
    m.add_argument("--generator", help="generator: a short name (e.g. smollm2-135m-instruct) or a local HF folder")
    m.add_argument("--reasoner", help="reasoner: a short name or a local HF folder (same tokenizer as the generator)")
    m.add_argument("--model", help="continue from a flythinker checkpoint folder instead of --generator/--reasoner")
    m.add_argument("--lambda", dest="fusion_lambda", type=_lambda, default=None,
                   help="fusion weight lambda (default: 0.5, or the checkpoint's)")
    m.add_argument("--norm-target", default=None, help="'vocab_mean' (default), 'token' or a positive number")
    m.add_argument("--projection", choices=("pad", "linear"), default=None, help="latent projection (default pad)")
    m.add_argument("--loss-impl", choices=("fused", "naive"), default=None, help="LM loss implementation")

    d = parser.add_argument_group("data")
    d.add_argument("--data", required=True, help="training file: JSONL of prompt/response, generator_prompt/"
                   "reasoner_prompt/response, messages, or persona records")
    d.add_argument("--eval-data", help="held-out file (same formats); its loss is reported after training")
    d.add_argument("--context", choices=("split", "shared"), default="split",
                   help="persona records only: split (reasoner reads the persona) or shared context")
    d.add_argument("--max-length", type=_positive(int), default=None, help="cap on generator sequence tokens")
    d.add_argument("--reasoner-max-length", type=_positive(int), default=None, help="cap on reasoner sequence tokens")
    d.add_argument("--chat-template", choices=("auto", "on", "off"), default="auto",
                   help="wrap string prompts in the tokenizer's chat template (auto: if it has one)")
    d.add_argument("--no-eos", action="store_true", help="do not append EOS to pair responses")
    d.add_argument("--padding-side", choices=("left", "right"), default="left")

    t = parser.add_argument_group("training")
    t.add_argument("--output-dir", required=True, help="where checkpoints and the final model are written")
    t.add_argument("--epochs", type=_positive(float), default=1.0, help="epochs (default %(default)s)")
    t.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    t.add_argument("--lr", type=_positive(float), default=1e-5, help="peak learning rate (default %(default)s)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps with linear warmup, in [0, 1)")
    t.add_argument("--batch-size", type=_positive(int), default=1, help="per-process batch size")
    t.add_argument("--grad-accum", type=_positive(int), default=1, help="gradient accumulation steps")
    t.add_argument("--train", default="both",
                   help="what trains: both (generator+reasoner+projection, default) or a comma list of "
                        "generator, reasoner, projection")
    t.add_argument("--lora", action="store_true", help="LoRA adapters instead of full fine-tuning")
    t.add_argument("--lora-r", type=_positive(int), default=8)
    t.add_argument("--lora-alpha", type=_positive(int), default=16)
    t.add_argument("--lora-dropout", type=float, default=0.0)
    t.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", help="comma list of module names")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    t.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast dtype; auto = bf16/fp16 on CUDA, fp32 on CPU")
    t.add_argument("--logging-steps", type=_positive(int), default=10, help="log the loss every N steps")
    t.add_argument("--save-steps", type=int, default=0, help="also checkpoint every N steps (0: only at the end)")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser


# ---- the run -------------------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"flythinker train: {msg}", file=sys.stderr, flush=True)


def _norm_target(text: str | None):
    if text is None or text in ("vocab_mean", "token"):
        return text
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--norm-target must be 'vocab_mean', 'token' or a positive number, got {text!r}") from None


def _load_pair(args):
    """(model, tokenizer) from --model or --generator/--reasoner."""
    from transformers import AutoConfig, AutoTokenizer

    from flythinker.modeling import FlyThinkerForCausalLM
    from flythinker.hub import ModelNotFoundError, resolve

    fusion = {k: v for k, v in (("fusion_lambda", args.fusion_lambda), ("norm_target", _norm_target(args.norm_target)),
                                ("projection", args.projection), ("loss_impl", args.loss_impl)) if v is not None}
    if args.model:
        if args.generator or args.reasoner:
            raise UserError("give either --model (a flythinker checkpoint) or --generator and --reasoner, not both")
        folder = Path(args.model).expanduser()
        if not (folder / "config.json").is_file():
            raise UserError(f"--model {args.model}: not a folder with a config.json")
        if json.loads((folder / "config.json").read_text()).get("model_type") != "flythinker":
            raise UserError(f"--model {args.model}: not a flythinker checkpoint (use --generator/--reasoner for "
                            "plain models)")
        if "projection" in fusion:
            raise UserError("--projection cannot change on an existing checkpoint")
        model = FlyThinkerForCausalLM.from_pretrained(folder)
        for k, v in fusion.items():
            setattr(model.config, k, v)
        try:
            model.config.check_fusion()
        except ValueError as e:
            raise UserError(str(e)) from None
        return model, AutoTokenizer.from_pretrained(folder)
    if not (args.generator and args.reasoner):
        raise UserError("need --generator and --reasoner (or --model with a flythinker checkpoint)")
    try:
        g_path, r_path = resolve(args.generator), resolve(args.reasoner)
    except ModelNotFoundError as e:
        raise UserError(str(e)) from None
    for name, path in (("generator", g_path), ("reasoner", r_path)):
        if AutoConfig.from_pretrained(path).model_type == "flythinker":
            raise UserError(f"--{name} {path} is a flythinker checkpoint: pass it with --model")
    g_tok, r_tok = AutoTokenizer.from_pretrained(g_path), AutoTokenizer.from_pretrained(r_path)
    if g_tok.get_vocab() != r_tok.get_vocab():
        raise UserError(f"incompatible pair: the generator ({args.generator}) and the reasoner ({args.reasoner}) "
                        "do not share one tokenizer vocabulary")
    fusion.setdefault("fusion_lambda", 0.5)
    try:
        model = FlyThinkerForCausalLM.from_pair(str(g_path), str(r_path), **fusion)
    except ValueError as e:
        raise UserError(f"incompatible pair: {e}") from None
    return model, g_tok


def _datasets(args, tokenizer):
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
            raise UserError(str(e)) from None
    return out


def _train(args) -> int:
    import torch
    from transformers import TrainingArguments, set_seed

    from flythinker.training.collator import FlyThinkerCollator
    from flythinker.training.trainable import (
        apply_lora,
        enable_gradient_checkpointing,
        parse_parts,
        resolve_precision,
        set_trainable,
    )
    from flythinker.training.trainer import FlyThinkerTrainer, JsonlLogCallback

    for path in (args.data, args.eval_data):
        if path is not None and not Path(path).is_file():
            raise UserError(f"data file not found: {path}")
    try:
        parts = parse_parts(args.train)
        dtype = resolve_precision(args.precision, "cuda" if torch.cuda.is_available() else "cpu")
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.max_steps == 0 or args.max_steps < -1:
        raise UserError(f"--max-steps must be positive (or -1 to use --epochs), got {args.max_steps}")
    set_seed(args.seed)
    model, tokenizer = _load_pair(args)
    (train_ex, kind), (eval_ex, eval_kind) = _datasets(args, tokenizer)
    if eval_ex is not None and ("reasoner_prompt" in eval_ex[0]) != ("reasoner_prompt" in train_ex[0]):
        raise UserError("--data and --eval-data must both be split context or both shared context")

    if model.config.fusion_lambda == 0 and "reasoner" in parts:
        parts = parts - {"reasoner"}  # lambda = 0: the reasoner cannot affect the loss; train nothing there
        _log("lambda = 0: the reasoner gets no gradient, so it is frozen")
        if not parts:
            raise UserError("lambda = 0 with --train reasoner: nothing can learn")
    if args.lora:
        if not parts - {"projection"}:
            raise UserError("--lora needs the generator and/or the reasoner in --train")
        try:
            apply_lora(model, parts - {"projection"}, r=args.lora_r, alpha=args.lora_alpha,
                       dropout=args.lora_dropout, target_modules=[t for t in args.lora_targets.split(",") if t])
        except ValueError as e:
            raise UserError(str(e)) from None
    try:
        counts = set_trainable(model, parts)
    except ValueError as e:
        raise UserError(str(e)) from None
    _log("trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)

    chat = {"on": True, "off": False}.get(args.chat_template, getattr(tokenizer, "chat_template", None) is not None)
    collator = FlyThinkerCollator(tokenizer=tokenizer, padding_side=args.padding_side, chat_template=chat,
                                  add_eos=not args.no_eos and kind == "pairs", max_length=args.max_length,
                                  reasoner_max_length=args.reasoner_max_length)
    try:
        collator(train_ex[:1])  # fail early, in one line, on data the collator cannot use
    except (TypeError, ValueError) as e:
        raise UserError(f"{args.data}: {e}") from None

    out = Path(args.output_dir)
    targs = TrainingArguments(
        output_dir=str(out),
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
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        seed=args.seed,
        data_seed=args.seed,
        remove_unused_columns=False,  # the collator needs the raw prompt/response fields
        ddp_find_unused_parameters=False,  # every trainable parameter reaches the loss (see set_trainable)
        dataloader_num_workers=0,
        disable_tqdm=args.no_progress,
        report_to="none",
    )
    trainer = FlyThinkerTrainer(model=model, args=targs, train_dataset=train_ex, eval_dataset=eval_ex,
                                data_collator=collator, processing_class=tokenizer,
                                callbacks=[JsonlLogCallback(out / "train_log.jsonl")])
    start = time.perf_counter()
    result = trainer.train()
    _log(f"{result.global_step} steps in {time.perf_counter() - start:.1f}s, mean train loss "
         f"{result.training_loss:.4f}")
    if eval_ex is not None:
        metrics = trainer.evaluate()
        _log(f"held-out loss {metrics['eval_loss']:.4f}")
    trainer.save_model(str(out))  # merged weights (LoRA folded in) + tokenizer; main process only
    if trainer.is_world_process_zero():
        # Trainer pickles its arguments next to the weights; the final folder stays pickle-free (JSON instead)
        (out / "training_args.bin").unlink(missing_ok=True)
        (out / "training_args.json").write_text(targs.to_json_string())
        _log(f"saved checkpoint to {out} (load with FlyThinkerForCausalLM.from_pretrained / flythinker generate)")
    return 0


def run_train(args: argparse.Namespace) -> int:
    """Run `flythinker train`; returns the exit status (2 with a one-line message on bad input)."""
    logging.getLogger("transformers").setLevel(logging.WARNING)
    try:
        return _train(args)
    except UserError as e:
        if getattr(args, "debug", False):
            raise
        print(f"flythinker: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
