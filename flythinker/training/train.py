"""Training entry point that any launcher can run unchanged:

    python -m flythinker.training.train --generator G --reasoner R --data D --output-dir OUT ...
    torchrun --nproc_per_node 2 -m flythinker.training.train ...        (DDP; gloo on CPU)
    accelerate launch -m flythinker.training.train ...

`flythinker train` runs the same code (`flythinker.training.cli.run_train`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flythinker.training.cli import add_train_arguments, run_train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flythinker-train", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    return add_train_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return run_train(args)


if __name__ == "__main__":
    sys.exit(main())
