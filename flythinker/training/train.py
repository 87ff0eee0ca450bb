"""Launcher alias of `flythinker train`, kept so launch commands written for it keep working:

    python -m flythinker.training.train --generator G --reasoner R --data D --output-dir OUT ...
    torchrun --nproc_per_node 2 -m flythinker.training.train ...        (DDP; gloo on CPU)
    accelerate launch -m flythinker.training.train ...

It is an entry point, not library code: nothing in flythinker imports it, and it only forwards to the CLI
(`flythinker.cli.train` holds the command; `-m flythinker.cli train ...` is the same run).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """`flythinker train ARGV`; returns the exit status (2 with a one-line message on bad input).

    Args:
        argv: the arguments after `train` (`flythinker train --help` lists them); None reads `sys.argv[1:]`.
    """
    from flythinker.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
