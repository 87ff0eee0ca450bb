"""The `flythinker` command line: demo, generate, train, eval, bench, info, serve, judge, rl, alpsbench.

One module per subcommand (`flythinker/cli/<name>.py`: `HELP`, `DESCRIPTION`, `add_arguments(parser)`,
`run(args) -> exit status`); what they share (the one user-error type, argument types, the pair loader,
streamed generation) is `flythinker.cli.common`. The CLI imports the library, never the other way round.

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

from flythinker.cli import alpsbench, bench, demo, eval, generate, info, judge, rl, serve, train
from flythinker.cli.common import EXIT_USER_ERROR, CLIError, Parser, user_error_types

COMMANDS = {"demo": demo, "generate": generate, "train": train, "eval": eval, "bench": bench, "info": info,
            "serve": serve, "judge": judge, "rl": rl, "alpsbench": alpsbench}


def build_parser() -> argparse.ArgumentParser:
    """The `flythinker` parser with one subparser per entry of :data:`COMMANDS`."""
    from flythinker import __version__

    parser = Parser(
        prog="flythinker",
        description="Think-while-generating personalisation: a reasoner model reads the person, a generator "
                    "writes, and the reasoner's latent thoughts are fused into the generator token by token.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for user errors too")
    parser.add_argument("--version", action="version", version=f"flythinker {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, module in COMMANDS.items():
        module.add_arguments(subs.add_parser(name, help=module.HELP, description=module.DESCRIPTION))
    return parser


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
        return COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        print("flythinker: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `flythinker generate ... | head`
        return 0
    except Exception as exc:  # `except user_error_types()` would import them even on SystemExit (--help)
        if debug or not isinstance(exc, user_error_types()):
            raise
        print(f"flythinker: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR


__all__ = ["CLIError", "COMMANDS", "EXIT_USER_ERROR", "build_parser", "main"]
