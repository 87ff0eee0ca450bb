"""RL fine-tuning of a FlyThinker pair: GRPO through TRL (``pip install 'flythinker[rl]'``).

- ``rewards``: :class:`TraitReward` (rule-based, persona-empathy traits), :class:`LengthPenalty` (PERM),
  :class:`JudgeReward` (PERM / PereGRM judges from :mod:`flythinker.empathy`; :func:`judge_reward` builds one),
  :func:`combine_rewards`.
- ``trainer``: :class:`FlyThinkerGRPOTrainer` (split context, LoRA, reference model, fusion-preserving log-probs).
- ``data``: :func:`grpo_rows` (persona records -> dataset rows), held-out strategy accuracy with bootstrap CIs.

The trainer module imports TRL; it is loaded on first use so the rewards work without the extra.
"""

from flythinker.rl.data import bootstrap_ci, generate_responses, grpo_rows, paired_bootstrap_diff, strategy_report
from flythinker.rl.rewards import (
    JudgeReward,
    LengthPenalty,
    TraitReward,
    combine_rewards,
    completion_text,
    judge_reward,
)


def __getattr__(name: str):
    if name in ("FlyThinkerGRPOTrainer", "GRPOConfig", "completion_logps"):
        from flythinker.rl import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'flythinker.rl' has no attribute {name!r}")


__all__ = [
    "FlyThinkerGRPOTrainer", "GRPOConfig", "JudgeReward", "LengthPenalty", "TraitReward", "bootstrap_ci",
    "combine_rewards", "completion_logps", "completion_text", "generate_responses", "grpo_rows", "judge_reward",
    "paired_bootstrap_diff", "strategy_report",
]
