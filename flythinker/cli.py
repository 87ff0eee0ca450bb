"""The `flythinker` command line: demo, generate, train, bench, info.

Every subcommand imports its heavy dependencies lazily, so `flythinker --help` is instant. User errors (a
missing file, a malformed persona record, an unknown model, an incompatible pair, a bad option value) end
with one line, `flythinker: error: ...`, and exit status 2; a real bug keeps its traceback. `--debug` shows
the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

EXIT_USER_ERROR = 2


class CLIError(Exception):
    """A user error: printed as one line, no traceback (unless --debug)."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (`flythinker: error: ...`) instead of usage + error."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        hint = f" (see: flythinker {sub} --help)" if sub else " (see: flythinker --help)"
        raise CLIError(f"{message}{hint}")


# ---- option value checkers (argparse `type=`): a bad value is a one-line user error ----------------------------
def _checked(cast, ok, what):
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse shows the type's name in "invalid <name> value"
    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
nonneg_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: v > 0 and v == v and v != float("inf"), "a positive number")
unit_float = _checked(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
prob_float = _checked(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
lambda_float = _checked(float, lambda v: 0.0 <= v <= 100.0, "a number in [0, 100]")


# ---- parser -----------------------------------------------------------------------------------------------------
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flythinker",
        description="Think-while-generating personalisation: a reasoner model reads the person, a generator "
                    "writes, and the reasoner's latent thoughts are fused into the generator token by token.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for user errors too")
    from flythinker import __version__

    parser.add_argument("--version", action="version", version=f"flythinker {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # demo
    from flythinker.demo import add_demo_arguments

    p = subs.add_parser("demo", help="fine-tune SmolLM2 on persona-empathy and compare it with the plain model",
                        description="Fine-tune a SmolLM2-135M-Instruct pair in split context on the bundled "
                                    "persona-empathy training users (cached after the first run), then answer "
                                    "test users' queries with the generator alone and with flythinker, side "
                                    "by side, with tokens/s and the strategy metric of each reply. Offline.")
    add_demo_arguments(p)

    # generate
    p = subs.add_parser("generate", help="generate text with a pair or a saved flythinker checkpoint",
                        description="Generate with a flythinker model, streaming the text to stdout (timing "
                                    "to stderr). The model is a saved checkpoint (--model) or a pair built on "
                                    "the fly (--generator [--reasoner]). The prompt is text (--prompt, "
                                    "optionally --reasoner-prompt for split context) or a persona record file "
                                    "(--record, --record-index, --mode).")
    src = p.add_argument_group("model")
    src.add_argument("--model", metavar="PATH",
                     help="a flythinker checkpoint folder (as written by `flythinker train`/save_pretrained)")
    src.add_argument("--generator", metavar="NAME_OR_PATH",
                     help="generator model: a known short name (smollm2-135m-instruct) or an HF folder")
    src.add_argument("--reasoner", metavar="NAME_OR_PATH",
                     help="reasoner model for a pair (default: a second copy of the generator)")
    src.add_argument("--lambda", dest="fusion_lambda", type=lambda_float, default=None,
                     help="fusion weight λ (0 = the generator alone; default: the checkpoint's, 0.5 for a pair). "
                          "A pair is meant to be fine-tuned first: untrained, λ=0.5 derails the generator "
                          "(SmolLM2 pair: response loss 4.25 -> 8.39), λ=0.1 barely changes it (4.42)")
    src.add_argument("--norm-target", default=None, help="pair only: vocab_mean | token | a float")
    src.add_argument("--projection", choices=("pad", "linear"), default=None, help="pair only: pad | linear")
    src.add_argument("--parallel", choices=("auto", "off", "threads", "streams"), default=None,
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
    inp.add_argument("--record-format", default="auto",
                     choices=("auto", "longlamp", "personaemp", "perm", "flythinker"),
                     help="format of --record (default: %(default)s: detected from the first record's keys)")
    inp.add_argument("--record-index", type=nonneg_int, default=0,
                     help="which record of the file to answer (default: %(default)s)")
    inp.add_argument("--mode", choices=("split", "shared"), default="split",
                     help="record views: split (reasoner reads history, generator the query) or shared")
    inp.add_argument("--max-reasoner-tokens", type=positive_int, default=1024,
                     help="token budget of the reasoner's view of a record; oldest history dropped first")
    add_sampling_arguments(p)
    out = p.add_argument_group("output")
    out.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming")
    out.add_argument("--generator-only", action="store_true",
                     help="run the generator alone (no reasoner, no latents), for comparison")

    # train (helper G's arguments)
    p = subs.add_parser("train", help="fine-tune a pair jointly on (prompt, response) data",
                        description="Single-pass joint training of a generator/reasoner pair; saves a checkpoint "
                                    "that `flythinker generate --model` loads.")
    try:
        from flythinker.training.cli import add_train_arguments
    except ImportError:  # training CLI not installed in this build
        add_train_arguments = None
    if add_train_arguments is not None:
        add_train_arguments(p)

    # bench
    from flythinker.report import add_bench_arguments

    p = subs.add_parser("bench", help="run the benchmark suites and write benchmarks/results/REPORT.md",
                        description="Run the benchmark scripts in benchmarks/ (each in its own process), collect "
                                    "their JSON results and write REPORT.md with tables and PNG plots. Every "
                                    "figure is a ratio to a baseline measured in the same run.")
    add_bench_arguments(p)

    # info
    p = subs.add_parser("info", help="versions, active kernel backends, devices, cache folder",
                        description="Print flythinker/torch/triton/transformers versions, the backend each fused "
                                    "op would use on each device (Triton / C++ / PyTorch), devices and the "
                                    "model cache folder.")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return parser


# ---- subcommands -------------------------------------------------------------------------------------------------
def _cmd_generate(args) -> int:
    from flythinker.cli_generate import run_generate

    return run_generate(args)


def _cmd_demo(args) -> int:
    from flythinker.demo import run_demo

    return run_demo(args)


def _cmd_train(args) -> int:
    try:
        from flythinker.training.cli import run_train
    except ImportError as exc:
        raise CLIError(f"training is not available in this build ({exc})") from exc
    result = run_train(args)
    return result if isinstance(result, int) else 0


def _cmd_bench(args) -> int:
    from flythinker.report import run_bench

    return run_bench(args)


def _cmd_info(args) -> int:
    from flythinker.info import print_info

    print_info(as_json=args.json)
    return 0


COMMANDS = {"demo": _cmd_demo, "generate": _cmd_generate, "train": _cmd_train, "bench": _cmd_bench,
            "info": _cmd_info}


def _user_error_types() -> tuple[type[BaseException], ...]:
    from flythinker.hub import ModelNotFoundError

    types: list[type[BaseException]] = [CLIError, ModelNotFoundError, FileNotFoundError, IsADirectoryError,
                                        NotADirectoryError, PermissionError]
    try:
        from flythinker.persona import RecordError

        types.append(RecordError)
    except ImportError:
        pass
    return tuple(types)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return text


def _quiet_transformers() -> None:
    """No per-load "Loading weights" bars and info logs: loads take < 1 s; our own bars cover long stages."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flythinker` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line, not only before the subcommand
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.debug = debug
        if args.command is None:
            parser.print_help()
            return EXIT_USER_ERROR
        _quiet_transformers()
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("flythinker: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `flythinker generate ... | head`
        return 0
    except _user_error_types() as exc:
        if debug:
            raise
        print(f"flythinker: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
