"""`flythinker generate`: load a pair or a checkpoint, build the prompt(s), stream the reply.

Stages are wrapped so that a user error in one of them (a bad model name, an incompatible pair, a malformed
record) is reported as a one-line `CLIError`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flythinker.cli import CLIError


@dataclass
class Prompts:
    """Token ids of the generator's prompt and (split context) the reasoner's, each [1, L]."""

    generator: torch.Tensor
    reasoner: torch.Tensor | None = None
    description: str = ""


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"bad --device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name} asked for CUDA but torch sees no CUDA device (torch {torch.__version__})")
    return device


def model_class():
    try:
        from flythinker import FlyThinkerForCausalLM
    except ImportError:
        from flythinker.modeling import FlyThinkerForCausalLM
    return FlyThinkerForCausalLM


def load_tokenizer_for(folder: Path):
    """The tokenizer saved in a model/checkpoint folder (or in its generator/ subfolder)."""
    from transformers import AutoTokenizer

    for candidate in (folder, folder / "generator", folder / "tokenizer"):
        if (candidate / "tokenizer_config.json").is_file() or (candidate / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(candidate)
    raise CLIError(f"no tokenizer found in {folder} (expected tokenizer.json / tokenizer_config.json)")


def _check_pair_compatible(gen_dir: Path, rsn_dir: Path) -> None:
    """Both models must share one vocabulary (DESIGN.md 1): compare vocab sizes and tokenizers up front."""
    sizes = []
    for d in (gen_dir, rsn_dir):
        with open(d / "config.json") as fh:
            cfg = json.load(fh)
        cfg = cfg.get("text_config", cfg)
        sizes.append(cfg.get("vocab_size"))
    if sizes[0] != sizes[1]:
        raise CLIError(f"incompatible pair: generator vocab_size={sizes[0]} but reasoner vocab_size={sizes[1]} "
                       "(the two models must share one tokenizer)")
    files = [d / "tokenizer.json" for d in (gen_dir, rsn_dir)]
    if all(f.is_file() for f in files):
        vocabs = [json.loads(f.read_text()).get("model", {}).get("vocab") for f in files]
        if vocabs[0] != vocabs[1]:
            raise CLIError("incompatible pair: the generator and reasoner tokenizers have different vocabularies")


def load_model(args, device: torch.device):
    """(model, tokenizer, kind) from --model or --generator/--reasoner; kind is 'flythinker' or 'generator'."""
    from flythinker.hub import ModelNotFoundError, resolve

    dtype = getattr(torch, args.dtype)
    if args.model and args.generator:
        raise CLIError("give either --model (a checkpoint) or --generator/--reasoner (a pair), not both")
    if not args.model and not args.generator:
        raise CLIError("no model: give --model PATH (checkpoint) or --generator NAME_OR_PATH [--reasoner ...]")
    if args.model:
        folder = Path(args.model).expanduser()
        if not (folder / "config.json").is_file():
            raise CLIError(f"--model {args.model}: not a checkpoint folder (no config.json)")
        with open(folder / "config.json") as fh:
            model_type = json.load(fh).get("model_type")
        tokenizer = load_tokenizer_for(folder)
        if model_type != "flythinker":  # a plain HF model: it is a generator on its own
            from flythinker.hub import load_pretrained

            model, _ = load_pretrained(folder, dtype=dtype, with_tokenizer=False)
            return model.to(device), tokenizer, "generator"
        overrides = {k: v for k, v in (("fusion_lambda", args.fusion_lambda), ("parallel", args.parallel))
                     if v is not None}
        try:
            model = model_class().from_pretrained(folder, dtype=dtype, **overrides)
        except (OSError, ValueError) as exc:
            raise CLIError(f"cannot load checkpoint {folder}: {exc}") from exc
        if args.generator_only:
            return model.generator.to(device).eval(), tokenizer, "generator"
        return model.to(device).eval(), tokenizer, "flythinker"

    from flythinker.hub import load_pretrained

    gen_dir = resolve(args.generator)  # ModelNotFoundError -> one-line user error
    tokenizer = load_tokenizer_for(gen_dir)
    generator, _ = load_pretrained(gen_dir, dtype=dtype, with_tokenizer=False)
    if args.generator_only:
        return generator.to(device), tokenizer, "generator"
    rsn_dir = resolve(args.reasoner) if args.reasoner else gen_dir
    _check_pair_compatible(gen_dir, rsn_dir)
    reasoner, _ = load_pretrained(rsn_dir, dtype=dtype, with_tokenizer=False)
    fusion = {"fusion_lambda": 0.5 if args.fusion_lambda is None else args.fusion_lambda}
    if args.norm_target is not None:
        try:
            fusion["norm_target"] = float(args.norm_target)
        except ValueError:
            fusion["norm_target"] = args.norm_target
    if args.projection is not None:
        fusion["projection"] = args.projection
    if args.parallel is not None:
        fusion["parallel"] = args.parallel
    try:
        model = model_class().from_pair(generator, reasoner, **fusion)
    except (ValueError, TypeError, ModelNotFoundError) as exc:
        raise CLIError(f"incompatible pair or options: {exc}") from exc
    return model.to(device).eval(), tokenizer, "flythinker"


def _chat_ids(tokenizer, text: str, system: str | None, raw: bool) -> list[int]:
    if raw or not getattr(tokenizer, "chat_template", None):
        return list(tokenizer(text)["input_ids"])
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def build_prompts(args, tokenizer) -> Prompts:
    """Prompt ids from --prompt/--reasoner-prompt or from a persona record file."""
    if args.record and args.prompt:
        raise CLIError("give either --prompt or --record, not both")
    if args.record:
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
        note = f" (dropped {views.truncated_turns} oldest turns to fit)" if views.truncated else ""
        return Prompts(g, r, f"record {record.record_id!r} ({args.mode} context){note}")
    if args.prompt is None:
        if args.reasoner_prompt is not None:
            raise CLIError("--reasoner-prompt needs --prompt (what the generator reads)")
        raise CLIError("no input: give --prompt TEXT or --record FILE")
    g = torch.tensor([_chat_ids(tokenizer, args.prompt, args.system, args.raw)])
    r = None
    if args.reasoner_prompt is not None:
        r = torch.tensor([_chat_ids(tokenizer, args.reasoner_prompt, args.system, args.raw)])
    return Prompts(g, r, "split context" if r is not None else "shared context")


def generation_kwargs(args) -> dict:
    """HF generate() kwargs from the common decoding options."""
    kw: dict = {"max_new_tokens": args.max_new_tokens, "do_sample": bool(args.do_sample),
                "num_beams": args.num_beams}
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p}
    given = {k: v for k, v in sampling.items() if v is not None}
    if given and not args.do_sample:
        raise CLIError(f"{', '.join('--' + k.replace('_', '-') for k in given)} only apply with --do-sample")
    if args.do_sample and getattr(args, "sampler", "hf") == "fused" and args.num_beams == 1:
        from flythinker.sampling import FusedSamplingLogitsProcessor

        proc = FusedSamplingLogitsProcessor(temperature=given.get("temperature", 1.0), top_k=given.get("top_k"),
                                            top_p=given.get("top_p", 1.0), min_p=given.get("min_p", 0.0),
                                            seed=args.seed)
        kw.update(proc.generate_kwargs())  # do_sample=False + our processor: HF builds no warpers of its own
        return kw
    kw.update(given)
    return kw


def generate(model, kind: str, prompts: Prompts, tokenizer, gen_kwargs: dict, *, stream: bool,
             out=None) -> tuple[str, int, float]:
    """Run generation (streamed to `out` when `stream`); returns (text, new tokens, seconds)."""
    from transformers import TextStreamer

    out = out or sys.stdout
    device = next(model.parameters()).device
    ids = prompts.generator.to(device)
    kw = dict(gen_kwargs, attention_mask=torch.ones_like(ids))
    if tokenizer.pad_token_id is not None:
        kw["pad_token_id"] = tokenizer.pad_token_id
    elif tokenizer.eos_token_id is not None:
        kw["pad_token_id"] = tokenizer.eos_token_id
    if kind == "flythinker" and prompts.reasoner is not None:
        r = prompts.reasoner.to(device)
        kw.update(reasoner_input_ids=r, reasoner_attention_mask=torch.ones_like(r))
    streamer = None
    if stream and kw.get("num_beams", 1) == 1:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)  # prints to stdout
        kw["streamer"] = streamer
    start = time.perf_counter()
    with torch.inference_mode():
        seq = model.generate(ids, **kw)
    seconds = time.perf_counter() - start
    new = seq[0, ids.shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    if streamer is None:
        print(text, file=out, flush=True)
    return text, int(new.numel()), seconds


def run_generate(args) -> int:
    if args.seed is not None:
        torch.manual_seed(args.seed)
    gen_kwargs = generation_kwargs(args)
    device = pick_device(args.device)
    if args.record and not Path(args.record).expanduser().is_file():  # fail before loading any model
        raise CLIError(f"record file not found: {args.record}")
    model, tokenizer, kind = load_model(args, device)
    prompts = build_prompts(args, tokenizer)
    if kind == "generator" and prompts.reasoner is not None and not args.generator_only:
        print("flythinker: note: this model is a plain generator; --reasoner-prompt is ignored", file=sys.stderr)
    text, n_new, seconds = generate(model, kind, prompts, tokenizer, gen_kwargs, stream=not args.no_stream)
    g_len = prompts.generator.shape[1]
    r_len = prompts.reasoner.shape[1] if prompts.reasoner is not None else g_len
    who = "generator alone" if kind == "generator" else f"flythinker, {prompts.description}"
    print(f"[{who}] {n_new} new tokens in {seconds:.2f} s ({n_new / max(seconds, 1e-9):.1f} tok/s); prompt "
          f"tokens: generator {g_len}" + ("" if kind == "generator" else f", reasoner {r_len}"), file=sys.stderr)
    return 0
