"""AlpsBench (arXiv 2603.26680): loaders for its annotation packets and public rows, the paper's Task 1/2
record-matching score, Task 3 pools and accuracy, a task runner and the ``--predict-program`` adapter.

The benchmark's code is MIT and its data ODC-BY (github ThisIsCosine/AlpsBench,
MissHsiaoo/AlpsBench_task1_3_annotation_data_repo); everything here is written for flythinker from the paper's
definitions. See docs/alpsbench.md.
"""

from .data import AlpsBenchDataError, Packet, iter_packets, load_packet, read_jsonl, release_rows
from .matching import MatchWeights, RecordScore, match_items, rule_reviews, score_record
from .retrieval_task import DISTRACTOR_LEVELS, candidate_pool, memory_bank, selection_scores

__all__ = ["DISTRACTOR_LEVELS", "AlpsBenchDataError", "MatchWeights", "Packet", "RecordScore", "candidate_pool",
           "iter_packets", "load_packet", "match_items", "memory_bank", "read_jsonl", "release_rows",
           "rule_reviews", "score_record", "selection_scores"]
