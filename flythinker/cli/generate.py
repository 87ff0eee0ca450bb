"""`flythinker generate`: load a pair or a checkpoint, build the prompt(s), stream the reply."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flythinker.cli.common import (
    CLIError,
    Prompts,
    add_fusion_arguments,
    add_sampling_arguments,
    fusion_options,
    generate_text,
    generation_kwargs,
    load_checkpoint,
    load_pair,
    nonneg_int,
    positive_int,
    tokenizer_for,
)

HELP = "generate text with a pair or a saved flythinker checkpoint"
DESCRIPTION = ("Generate with a flythinker model, streaming the text to stdout (timing to stderr). The model is a "
               "saved checkpoint (--model) or a pair built on the fly (--generator [--reasoner]). The prompt is "
               "text (--prompt, optionally --reasoner-prompt for split context) or a persona record file "
               "(--record, --record-index, --mode).")
RECORD_FORMATS = ("auto", "longlamp", "personaemp", "perm", "flythinker")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from flythinker.options import PARALLEL_MODES

    src = p.add_argument_group("model")
    src.add_argument("--model", metavar="PATH",
                     help="a flythinker checkpoint folder (as written by `flythinker train`/save_pretrained) or a "
                          "shipped pair's name (smollm2-135m-persona-empathy); an existing path is always that path")
    src.add_argument("--generator", metavar="NAME_OR_PATH",
                     help="generator model: a known short name (smollm2-135m-instruct) or an HF folder")
    src.add_argument("--reasoner", metavar="NAME_OR_PATH",
                     help="reasoner model for a pair (default: a second copy of the generator)")
    add_fusion_arguments(src, lambda_help=(
        "fusion weight λ (0 = the generator alone; default: the checkpoint's, 0.5 for a pair). A pair is meant "
        "to be fine-tuned first: untrained, λ=0.5 derails the generator (SmolLM2 pair: response loss 4.25 -> "
        "8.39), λ=0.1 barely changes it (4.42)"))
    src.add_argument("--parallel", choices=PARALLEL_MODES, default=None,
                     help="how a decode step runs the two models (default: the checkpoint's, auto)")
    src.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                     help="weights dtype (default: %(default)s)")
    src.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    inp = p.add_argument_group("input")
    inp.add_argument("--prompt", help="the user message (goes through the tokenizer's chat template)")
    inp.add_argument("--reasoner-prompt",
                     help="split context: what the reasoner reads instead of --prompt (e.g. history + query)")
    inp.add_argument("--system", default=None, help="system message for --prompt / --reasoner-prompt")
    inp.add_argument("--raw", action="store_true", help="use prompts as plain text, without the chat template")
    inp.add_argument("--record", metavar="FILE",
                     help="persona record file (JSON/JSONL: longlamp, personaemp, perm or flythinker format)")
    inp.add_argument("--record-format", default="auto", choices=RECORD_FORMATS,
                     help="format of --record (default: %(default)s: detected from the first record's keys)")
    inp.add_argument("--record-index", type=nonneg_int, default=0,
                     help="which record of the file to answer (default: %(default)s)")
    inp.add_argument("--mode", choices=("split", "shared"), default="split",
                     help="record views: split (reasoner reads history, generator the query) or shared")
    inp.add_argument("--max-reasoner-tokens", type=positive_int, default=1024,
                     help="token budget of the reasoner's view of a record; oldest history dropped first")
    inp.add_argument("--memory", metavar="FILE",
                     help="a memory store (flythinker.memory) or an AlpsBench session packet: the reasoner reads "
                          "the memories --prompt needs (constraints first, then BM25), within --max-reasoner-tokens")
    inp.add_argument("--memory-turns", type=nonneg_int, default=0,
                     help="with --memory: also give the reasoner up to N most recent dialogue turns (default: 0)")
    add_sampling_arguments(p)
    out = p.add_argument_group("output")
    out.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming")
    out.add_argument("--generator-only", action="store_true",
                     help="run the generator alone (no reasoner, no latents), for comparison")


def pick_device(name: str | None):
    """`--device` (None: cuda if available, else cpu) as a torch.device; CLIError if it cannot be used."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"bad --device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name} asked for CUDA but torch sees no CUDA device (torch {torch.__version__})")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:  # e.g. mps on a torch built without it, cuda:7 of 1 GPU
        raise CLIError(f"--device {name} cannot be used here: {' '.join(str(exc).split())}") from None
    return device


def check_parallel(model, device) -> None:
    """`parallel="streams"` (given with --parallel) needs a CUDA device."""
    mode = getattr(getattr(model, "config", None), "parallel", None)
    if mode == "streams" and device.type != "cuda":
        raise CLIError(f"--parallel streams needs a CUDA device (the model runs on {device}); use threads or auto")


def load_model(args: argparse.Namespace):
    """(model, tokenizer) from --model or --generator/--reasoner; a plain HF model when --generator-only."""
    import torch

    from flythinker.hub import load_pretrained, resolve

    dtype = getattr(torch, args.dtype)
    if args.model and args.generator:
        raise CLIError("give either --model (a checkpoint) or --generator/--reasoner (a pair), not both")
    if not args.model and not args.generator:
        raise CLIError("no model: give --model PATH (checkpoint) or --generator NAME_OR_PATH [--reasoner ...]")
    fusion = fusion_options(args, "fusion_lambda", "norm_target", "projection", "parallel")
    if args.model:
        model, tokenizer = load_checkpoint(args.model, dtype=dtype, **fusion)
        if args.generator_only and hasattr(model, "generator"):
            return model.generator, tokenizer
        return _one_base_shared(model), tokenizer
    if args.generator_only:
        folder = resolve(args.generator)
        return load_pretrained(folder, dtype=dtype, with_tokenizer=False)[0], tokenizer_for(folder)
    model, tokenizer = load_pair(args.generator, args.reasoner, dtype=dtype, **fusion)
    return _one_base_shared(model), tokenizer


def _one_base_shared(model):
    """A pair whose halves are one base (the default: the generator and a second copy of itself, with or without
    LoRA adapters) decodes as a shared-base pair: the weights held and streamed once per token, the same tokens
    (flythinker.shared_base.share_pair; benchmarks/results/decode_pairs.json)."""
    from flythinker import FlyThinkerForCausalLM  # the package registers the decode loop and shipped pairs
    from flythinker.shared_base import share_pair

    shared = share_pair(model) if isinstance(model, FlyThinkerForCausalLM) else None
    return model if shared is None else shared.eval()


def _chat_ids(tokenizer, text: str, system: str | None, raw: bool) -> list[int]:
    if raw or not getattr(tokenizer, "chat_template", None):
        return list(tokenizer(text)["input_ids"])
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def _record_prompts(args: argparse.Namespace, tokenizer) -> Prompts:
    import torch

    from flythinker.persona import build_views, load_records

    path = Path(args.record).expanduser()
    if not path.is_file():
        raise CLIError(f"record file not found: {path}")
    try:
        records = load_records(path, format=args.record_format)
    except (ValueError, TypeError, KeyError) as exc:  # RecordError names the record and field
        raise CLIError(f"malformed persona record file {path}: {exc}") from exc
    if not records:
        raise CLIError(f"{path} holds no persona records")
    if args.record_index >= len(records):
        raise CLIError(f"--record-index {args.record_index} out of range: {path} holds {len(records)} records")
    record = records[args.record_index]
    try:
        views = build_views(record, tokenizer, mode=args.mode, max_reasoner_tokens=args.max_reasoner_tokens,
                            warn=False)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    g = torch.tensor([views.generator_prompt_ids])
    r = torch.tensor([views.reasoner_prompt_ids]) if args.mode == "split" else None
    cut = [f"{n} {what}" for n, what in ((views.truncated_turns, "oldest turns"),
                                         (views.truncated_memories, "oldest memories"),
                                         (views.truncated_persona_words, "persona words")) if n]
    note = f" (dropped {', '.join(cut)} to fit)" if views.truncated else ""
    return Prompts(g, r, f"record {record.record_id!r} ({args.mode} context){note}")


def _memory_prompts(args: argparse.Namespace, tokenizer) -> Prompts:
    import torch

    from flythinker.memory.reasoner import load_memories, memory_views

    if args.prompt is None or args.record or args.reasoner_prompt is not None:
        raise CLIError("--memory needs --prompt (the query) and neither --record nor --reasoner-prompt")
    try:
        memories, turns, what = load_memories(args.memory)
        mv = memory_views(memories, args.prompt, tokenizer, max_reasoner_tokens=args.max_reasoner_tokens,
                          recent_turns=turns[-args.memory_turns:] if args.memory_turns else ())
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    note = f", {len(mv.dropped_ids)} left out to fit" if mv.dropped_ids else ""
    return Prompts(torch.tensor([mv.views.generator_prompt_ids]), torch.tensor([mv.views.reasoner_prompt_ids]),
                   f"{what}: {len(mv.used_ids)} in the reasoner's view{note}, {mv.recent_turns} recent turns")


def build_prompts(args: argparse.Namespace, tokenizer) -> Prompts:
    """Prompt ids from --prompt/--reasoner-prompt, a persona record file, or a memory store (--memory)."""
    import torch

    if args.record and args.prompt:
        raise CLIError("give either --prompt or --record, not both")
    if getattr(args, "memory", None):
        return _memory_prompts(args, tokenizer)
    if args.record:
        return _record_prompts(args, tokenizer)
    if args.prompt is None:
        if args.reasoner_prompt is not None:
            raise CLIError("--reasoner-prompt needs --prompt (what the generator reads)")
        raise CLIError("no input: give --prompt TEXT or --record FILE")
    g = torch.tensor([_chat_ids(tokenizer, args.prompt, args.system, args.raw)], dtype=torch.long)
    r = None
    if args.reasoner_prompt is not None:
        r = torch.tensor([_chat_ids(tokenizer, args.reasoner_prompt, args.system, args.raw)], dtype=torch.long)
    for flag, ids in (("--prompt", g), ("--reasoner-prompt", r)):
        if ids is not None and ids.shape[1] == 0:
            raise CLIError(f"{flag} is empty after tokenisation (no tokens to start from); give some text")
    return Prompts(g, r, "split context" if r is not None else "shared context")


def run(args: argparse.Namespace) -> int:
    """Run `flythinker generate`; returns the exit status."""
    import torch

    from flythinker import FlyThinkerForCausalLM  # the package registers the decode loop and shipped pairs

    if args.seed is not None:
        torch.manual_seed(args.seed)
    gen_kwargs = generation_kwargs(args)
    device = pick_device(args.device)
    if args.record and not Path(args.record).expanduser().is_file():  # fail before loading any model
        raise CLIError(f"record file not found: {args.record}")
    if args.memory and not Path(args.memory).expanduser().is_file():
        raise CLIError(f"memory file not found: {args.memory}")
    model, tokenizer = load_model(args)
    model = model.to(device).eval()
    pair = isinstance(model, FlyThinkerForCausalLM)
    if pair:
        check_parallel(model, device)
    prompts = build_prompts(args, tokenizer)
    if not pair and prompts.reasoner is not None and not args.generator_only:
        print("flythinker: note: this model is a plain generator; --reasoner-prompt is ignored", file=sys.stderr)
    reply = generate_text(model, prompts, tokenizer, gen_kwargs, stream=not args.no_stream)
    g_len = prompts.generator.shape[1]
    r_len = prompts.reasoner.shape[1] if prompts.reasoner is not None else g_len
    who = f"flythinker, {prompts.description}" if pair else "generator alone"
    first = f", first token {reply.first_token_s:.2f} s" if reply.first_token_s is not None else ""
    print(f"[{who}] {reply.tokens} new tokens in {reply.seconds:.2f} s ({reply.tokens_per_s:.1f} tok/s{first}); prompt "
          f"tokens: generator {g_len}" + (f", reasoner {r_len}" if pair else "")
          + (f"; decode path: {reply.decode_path}" if pair else ""), file=sys.stderr)
    return 0
