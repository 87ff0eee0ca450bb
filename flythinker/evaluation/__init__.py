"""Evaluation of personalised pairs on persona records (``flythinker eval``).

- ``scoring``: per-record scores (reference-reply NLL, greedy replies, ROUGE-L via rouge-score, the persona-empathy
  trait metric) of a pair in split context, at lambda 0, or of a plain model reading the query or the full view.
- ``report``: :func:`evaluate_pair` (pair vs lambda 0 vs an optional baseline), per-user means, 95%
  user-bootstrap intervals and paired differences (scipy), :func:`format_table`, :func:`plot_report`.
"""

from .report import evaluate_pair, format_table, paired, plot_report, user_bootstrap
from .scoring import CONTEXTS, fusion_lambda, generate_replies, reply_nll, rouge_l, trait_hits

__all__ = ["CONTEXTS", "evaluate_pair", "format_table", "fusion_lambda", "generate_replies", "paired",
           "plot_report", "reply_nll", "rouge_l", "trait_hits", "user_bootstrap"]
