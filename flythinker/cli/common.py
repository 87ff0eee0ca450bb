"""What every `flythinker` subcommand shares: the one user-error type, argument types, argument groups, the one
pair loader and the streamed generation helper.

User errors (a missing file, a malformed record, an unknown model, an incompatible pair, a bad option value) are
raised as :class:`CLIError` (or one of :func:`user_error_types`) and printed by `flythinker.cli.main` as one line,
`flythinker: error: ...`, with exit status :data:`EXIT_USER_ERROR`; anything else is a bug and keeps its
traceback. Heavy imports (torch, transformers) happen inside the functions, so building the parser is instant.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

EXIT_USER_ERROR = 2


class CLIError(Exception):
    """A user error: printed as one line, no traceback (unless --debug)."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (`flythinker: error: ...`) instead of usage + error."""

    def error(self, message: str):  # argparse API
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        hint = f" (see: flythinker {sub} --help)" if sub else " (see: flythinker --help)"
        raise CLIError(f"{message}{hint}")


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, not a bug: reported in one line."""
    from flythinker.checkpoint import CheckpointError
    from flythinker.hub import ModelNotFoundError
    from flythinker.persona import RecordError
    from flythinker.persona.jsonio import JsonFileError
    from flythinker.run_folder import RunFolderError

    return (CLIError, CheckpointError, ModelNotFoundError, RecordError, JsonFileError, RunFolderError,
            FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


# ---- argument types: flythinker.cli.options (one validator per kind of numeric option) -----------------------
from flythinker.cli.options import (  # noqa: E402,F401  (re-exported: subcommands import them from here)
    lambda_float,
    nonneg_float,
    nonneg_int,
    norm_target,
    positive_float,
    positive_int,
    prob_float,
    ratio_float,
    sequence_int,
    unit_float,
)


# ---- argument groups shared by several subcommands --------------------------------------------------------------
def add_fusion_arguments(group, *, lambda_help: str) -> None:
    """`--lambda`, `--norm-target`, `--projection`: the fusion options of a pair (generate, train)."""
    from flythinker.options import NORM_TARGETS, PROJECTIONS

    group.add_argument("--lambda", dest="fusion_lambda", type=lambda_float, default=None, help=lambda_help)
    group.add_argument("--norm-target", type=norm_target, default=None,
                       help=f"latent rescaling target: {' | '.join(NORM_TARGETS)} | a positive number "
                            "(default: vocab_mean, or the checkpoint's)")
    group.add_argument("--projection", choices=PROJECTIONS, default=None,
                       help="reasoner -> generator width map of a new pair (default: pad)")


def add_sampling_arguments(p: argparse.ArgumentParser, default_max_new_tokens: int = 128) -> None:
    """The decoding options shared by `generate` and `demo`."""
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=positive_int, default=default_max_new_tokens,
                   help="most tokens to generate after the prompt (default: %(default)s)")
    g.add_argument("--do-sample", action="store_true",
                   help="sample from the distribution instead of greedy decoding")
    g.add_argument("--temperature", type=positive_float, default=None,
                   help="softmax temperature when sampling (>0; lower is more deterministic)")
    g.add_argument("--top-k", type=nonneg_int, default=None,
                   help="sample only among the k most likely tokens (0 disables)")
    g.add_argument("--top-p", type=unit_float, default=None,
                   help="nucleus sampling: smallest set of tokens whose probability sums to p, in (0, 1]")
    g.add_argument("--min-p", type=prob_float, default=None,
                   help="drop tokens less likely than min_p x the top token's probability, in [0, 1]")
    g.add_argument("--num-beams", type=positive_int, default=1,
                   help="beam search width (1 = no beam search; output is not streamed when > 1)")
    g.add_argument("--seed", type=int, default=None, help="random seed (makes sampling reproducible)")
    g.add_argument("--sampler", choices=("fused", "hf"), default="fused",
                   help="with --do-sample: fused = flythinker.kernels.sample (temperature/top-k/top-p/min-p in one "
                        "sorting-free pass; Triton on CUDA), hf = transformers' warper chain (default: %(default)s)")


def fusion_options(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The fusion options given on the command line (None = not given), by config field name."""
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


# ---- loading ----------------------------------------------------------------------------------------------------
def tokenizer_for(folder: Path):
    """The tokenizer saved in a model/checkpoint folder (or in its generator/ or tokenizer/ subfolder)."""
    from transformers import AutoTokenizer

    from flythinker.hub import has_tokenizer

    for candidate in (folder, folder / "generator", folder / "tokenizer"):
        if has_tokenizer(candidate):
            try:
                return AutoTokenizer.from_pretrained(candidate)
            except (OSError, ValueError, TypeError, KeyError) as exc:  # a damaged tokenizer file or config.json
                raise CLIError(f"cannot load the tokenizer in {candidate}: {' '.join(str(exc).split())}") from exc
    raise CLIError(f"no tokenizer found in {folder} (expected tokenizer.json / tokenizer_config.json)")


def load_pair(generator: str, reasoner: str | None = None, *, dtype: torch.dtype | None = None,
              **fusion: Any):
    """`(FlyThinkerForCausalLM, tokenizer)` from two short names or HF folders (generate, train and demo).

    `reasoner=None` pairs the generator with a second copy of itself (separate weights). The pair is checked
    before any weights load (:func:`flythinker.hub.check_pair_folders`: one vocabulary, valid fusion options);
    the tokenizer is the generator's. `fusion` goes to `from_pair` (fusion_lambda defaults to 0.5).
    """
    import torch

    from flythinker import FlyThinkerForCausalLM  # the package registers the decode loop and shipped pairs
    from flythinker.checkpoint import check_folder, load_errors
    from flythinker.hub import check_pair_folders, load_pretrained, resolve

    dtype = dtype or torch.float32
    g_dir = resolve(generator)  # ModelNotFoundError: a one-line user error
    r_dir = resolve(reasoner) if reasoner else g_dir
    fusion.setdefault("fusion_lambda", 0.5)
    for flag, folder in (("--generator", g_dir), ("--reasoner", r_dir)):
        try:
            check_folder(folder)
        except ValueError as exc:  # CheckpointError: the folder cannot load, named before anything else loads
            raise CLIError(f"{flag} {folder}: {exc}") from None
    try:
        check_pair_folders(g_dir, r_dir, **fusion)
    except load_errors() as exc:
        raise CLIError(f"incompatible pair or options: {' '.join(str(exc).split())}") from exc
    tokenizer = tokenizer_for(g_dir)
    gen, _ = load_pretrained(g_dir, dtype=dtype, with_tokenizer=False)
    rsn, _ = load_pretrained(r_dir, dtype=dtype, with_tokenizer=False)
    try:
        model = FlyThinkerForCausalLM.from_pair(gen, rsn, **fusion)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"incompatible pair or options: {exc}") from exc
    return model.eval(), tokenizer


def checkpoint_type(path: str) -> str:
    """`model_type` of a model folder's config.json (CLIError if it is not a usable model folder: missing, a
    file, an empty / invalid / non-object config.json, no model_type, missing or corrupt safetensors)."""
    from flythinker.checkpoint import CheckpointError, check_folder

    try:
        return check_folder(Path(path).expanduser())["model_type"]
    except CheckpointError as exc:
        raise CLIError(f"--model {path}: {exc}") from None


def load_checkpoint(path: str, *, dtype: torch.dtype | None = None, **overrides: Any):
    """`(model, tokenizer)` from a checkpoint folder: a saved flythinker pair, with `overrides` of its fusion
    options (lambda, norm target, parallel mode, loss impl; the projection is part of the weights), or, for
    a plain HF model, that model alone (no overrides allowed)."""
    import torch

    from flythinker import FlyThinkerForCausalLM  # the package registers the decode loop and shipped pairs
    from flythinker.checkpoint import load_errors
    from flythinker.hub import load_pretrained
    from flythinker.pretrained import shipped_name

    folder = Path(path).expanduser()
    if shipped_name(path):  # a shipped pair's name (no local path of that name: flythinker.pretrained)
        return _load_shipped(shipped_name(path), dtype or torch.float32, overrides)
    # the folder first (check_folder, then the weights), the tokenizer last: it reads config.json too and would
    # fail on a damaged one with a traceback of its own
    if checkpoint_type(path) != FlyThinkerForCausalLM.config_class.model_type:
        if overrides:
            raise CLIError(f"--model {path} is a plain model, not a flythinker pair: "
                           f"{', '.join(sorted(overrides))} do not apply to it")
        model, _ = load_pretrained(folder, dtype=dtype or torch.float32, with_tokenizer=False)
        return model, tokenizer_for(folder)
    if "projection" in overrides:
        raise CLIError("--projection cannot change on an existing checkpoint (it is part of its weights)")
    try:
        model = FlyThinkerForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
        for key, value in overrides.items():
            setattr(model.config, key, value)
        model.config.check_fusion()
    except (OSError, *load_errors()) as exc:  # CheckpointError names the folder and the problem
        raise CLIError(f"cannot load checkpoint {folder}: {exc}" if str(folder) not in str(exc) else str(exc)
                       ) from exc
    return model.eval(), tokenizer_for(folder)


def _load_shipped(name: str, dtype, overrides: dict[str, Any]):
    """`(pair, tokenizer)` of a shipped pair, with fusion-option overrides as for a checkpoint folder."""
    from flythinker import FlyThinkerForCausalLM  # the package registers the decode loop and shipped pairs
    from flythinker.hub import load_tokenizer

    if "projection" in overrides:
        raise CLIError("--projection cannot change on a shipped pair (it is part of its weights)")
    try:
        model = FlyThinkerForCausalLM.from_pretrained(name, dtype=dtype)
        for key, value in overrides.items():
            setattr(model.config, key, value)
        model.config.check_fusion()
    except (ValueError, TypeError, OSError) as exc:
        raise CLIError(f"cannot load shipped pair {name}: {exc}") from exc
    return model.eval(), load_tokenizer(name)


# ---- generation -------------------------------------------------------------------------------------------------
@dataclass
class Prompts:
    """Token ids of the generator's prompt and (split context) the reasoner's, each [1, L]."""

    generator: torch.Tensor
    reasoner: torch.Tensor | None = None
    description: str = ""


def generation_kwargs(args: argparse.Namespace) -> dict:
    """HF `generate()` kwargs from the decoding options of :func:`add_sampling_arguments`."""
    kw: dict = {"max_new_tokens": args.max_new_tokens, "do_sample": bool(args.do_sample),
                "num_beams": args.num_beams}
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p}
    given = {k: v for k, v in sampling.items() if v is not None}
    if given and not args.do_sample:
        raise CLIError(f"{', '.join('--' + k.replace('_', '-') for k in given)} only apply with --do-sample")
    if args.do_sample and args.sampler == "fused" and args.num_beams == 1:
        from flythinker.sampling import FusedSamplingLogitsProcessor

        proc = FusedSamplingLogitsProcessor(temperature=given.get("temperature", 1.0), top_k=given.get("top_k"),
                                            top_p=given.get("top_p", 1.0), min_p=given.get("min_p", 0.0),
                                            seed=args.seed)
        kw.update(proc.generate_kwargs())  # do_sample=True + our processor: its one-hot scores pass any HF warper
        return kw
    kw.update(given)
    return kw


class Reply(NamedTuple):
    """One generated reply: its text, new tokens, wall seconds of the generate call, and the seconds to its first
    new token (the prefill: for a split pair, the reasoner reading the history; None with beam search), and the
    decode loop a pair's generate() ran (`flythinker.decode.generate_path`; None for a plain model)."""

    text: str
    tokens: int
    seconds: float
    first_token_s: float | None
    decode_path: str | None = None

    @property
    def tokens_per_s(self) -> float:
        """End to end: new tokens over the whole call, prefill included."""
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """After the first token: the decode loop's rate (None without a first-token time or with one token)."""
        if self.first_token_s is None or self.tokens < 2:
            return None
        return (self.tokens - 1) / max(self.seconds - self.first_token_s, 1e-9)


class _TimingStreamer:
    """A transformers streamer that notes when the first new token arrives (the first `put` is the prompt) and
    passes every call on to `inner` (the printing TextStreamer, or None)."""

    def __init__(self, inner: Any, start: float) -> None:
        self.inner, self.start, self.first, self._puts = inner, start, None, 0

    def put(self, value: Any) -> None:
        self._puts += 1
        if self._puts == 2:
            self.first = time.perf_counter() - self.start
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def generate_text(model, prompts: Prompts, tokenizer, gen_kwargs: dict, *, stream: bool,
                  out=None) -> Reply:
    """Generate one reply to `prompts` with `model` (a FlyThinker pair, which also reads `prompts.reasoner`,
    or a plain HF model), streamed to stdout when `stream`; returns the :class:`Reply` (text, new tokens, seconds,
    seconds to the first token)."""
    import torch
    from transformers import TextStreamer

    from flythinker import FlyThinkerForCausalLM  # the package registers the decode loop and shipped pairs

    out = out or sys.stdout
    device = next(model.parameters()).device
    ids = prompts.generator.to(device)
    kw = dict(gen_kwargs, attention_mask=torch.ones_like(ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        kw["pad_token_id"] = pad
    if isinstance(model, FlyThinkerForCausalLM) and prompts.reasoner is not None:
        r = prompts.reasoner.to(device)
        kw.update(reasoner_input_ids=r, reasoner_attention_mask=torch.ones_like(r))
    streamer = None
    start = time.perf_counter()
    if kw.get("num_beams", 1) == 1:  # transformers refuses a streamer with beam search
        printer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        streamer = kw["streamer"] = _TimingStreamer(printer, start)  # prints to stdout when streamed
    path = None
    if isinstance(model, FlyThinkerForCausalLM):
        from flythinker.decode import generate_path

        path = generate_path(model, ids, **kw)
    with torch.inference_mode():
        seq = model.generate(ids, **kw)
    seconds = time.perf_counter() - start
    new = seq[0, ids.shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    if streamer is None or streamer.inner is None:
        print(text, file=out, flush=True)
    return Reply(text, int(new.numel()), seconds, None if streamer is None else streamer.first, path)


def bundled_records(spec: str) -> list:
    """The records of a bundled data set named `bundled:NAME[@VERSION]:SPLIT` (``flythinker.persona.load_dataset``),
    or CLIError naming the form."""
    from flythinker.persona import load_dataset

    parts = spec.removeprefix("bundled:").split(":")
    if len(parts) != 2 or not all(parts):
        raise CLIError(f"--data {spec}: expected bundled:NAME[@VERSION]:SPLIT, e.g. bundled:persona-empathy@2:train")
    name, split = parts
    name, _, version = name.partition("@")
    kwargs = {}
    if version:
        if not version.isdigit():
            raise CLIError(f"--data {spec}: the version after @ must be a number, got {version!r}")
        kwargs["version"] = int(version)
    try:
        return load_dataset(name, split, **kwargs)
    except (ValueError, TypeError) as e:
        raise CLIError(f"--data {spec}: {e}") from None


def reply_records(spec: str, purpose: str, select=None) -> list:
    """Persona records that each carry a reference reply, from a records file (any supported format) or a
    `bundled:NAME[@VERSION]:SPLIT` spec; `select` (records -> records) narrows them before the check. CLIError
    (one line, naming `purpose`, e.g. ``"eval"``) for a missing file, unreadable records, none left, or a record
    without a reply."""
    from flythinker.persona import RecordError, load_records

    if spec.startswith("bundled:"):
        records = bundled_records(spec)
    elif not Path(spec).is_file():
        raise CLIError(f"data file not found: {spec}")
    else:
        try:
            records = load_records(spec)
        except (RecordError, ValueError) as e:
            raise CLIError(f"{purpose} needs persona records in {spec}: {e}") from None
    records = select(records) if select is not None else records
    missing = [r.record_id for r in records if not r.response]
    if not records or missing:
        raise CLIError(f"{purpose}: {spec} has {len(records)} records, {len(missing)} without a reference reply "
                       f"(e.g. {missing[:1]}); each record needs one")
    return records
