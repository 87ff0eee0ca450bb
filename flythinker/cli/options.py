"""Every numeric command-line option's validator, one per kind of value (argparse `type=`).

A value is checked when the command line is parsed, before anything loads or runs: not a number, not finite
(`nan`, `inf`) or out of its range is a one-line user error (`flythinker: error: argument --x: expected ...`,
exit status 2). A subcommand picks the kind that fits its option; a new kind goes here, not inline in a parser.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


def checked(cast: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse type: `cast(text)`, then `ok(value)`; either failing is "expected WHAT, got 'text'"."""

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


def _finite(test: Callable[[float], bool]) -> Callable[[float], bool]:
    return lambda v: math.isfinite(v) and test(v)


positive_int = checked(int, lambda v: v > 0, "a positive integer")
nonneg_int = checked(int, lambda v: v >= 0, "an integer >= 0")
sequence_int = checked(int, lambda v: v >= 2, "an integer >= 2")
port_int = checked(int, lambda v: 1 <= v <= 65535, "a port number in [1, 65535]")
finite_float = checked(float, _finite(lambda v: True), "a finite number")
positive_float = checked(float, _finite(lambda v: v > 0), "a positive number")
nonneg_float = checked(float, _finite(lambda v: v >= 0), "a number >= 0")
ratio_float = checked(float, _finite(lambda v: 0.0 <= v < 1.0), "a number in [0, 1)")
unit_float = checked(float, _finite(lambda v: 0.0 < v <= 1.0), "a number in (0, 1]")
prob_float = checked(float, _finite(lambda v: 0.0 <= v <= 1.0), "a number in [0, 1]")
lambda_float = checked(float, _finite(lambda v: 0.0 <= v <= 100.0), "a number in [0, 100]")
judge_score_float = checked(float, _finite(lambda v: 1.0 <= v <= 5.0), "a judge score in [1, 5]")


def norm_target(text: str) -> str | float:
    """`--norm-target`: one of configuration.NORM_TARGETS or a positive finite number."""
    from flythinker.options import NORM_TARGETS

    if text in NORM_TARGETS:
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(NORM_TARGETS)} or a positive number, "
                                         f"got {text!r}")
    return value


norm_target.__name__ = "norm target"


__all__ = ["checked", "finite_float", "judge_score_float", "lambda_float", "nonneg_float", "nonneg_int",
           "norm_target", "port_int", "positive_float", "positive_int", "prob_float", "ratio_float", "sequence_int",
           "unit_float"]
