"""Single-pass joint training of a FlyThinker pair (docs/design.md, "Training").

- :class:`FlyThinkerCollator` (``collator``): (prompt, response) pairs / (generator prompt, reasoner prompt,
  response) triples -> padded ``input_ids``/``attention_mask``/``labels`` (+ ``reasoner_*`` for split context).
- ``trainable``: :func:`set_trainable` ("both" | generator | reasoner | projection), :func:`apply_lora`,
  :func:`save_merged`, :func:`save_lora_adapters` / :func:`load_lora_adapters`, :func:`trainable_state_dict`,
  :func:`enable_gradient_checkpointing`, :func:`autocast`.
- ``trainer``: :class:`FlyThinkerTrainer` (HF Trainer; LoRA-aware checkpoints), :class:`JsonlLogCallback`.
- ``data``: :func:`load_examples` (pair/triple/chat JSONL, persona records).
- ``loop``: :func:`train_loop`, the one small training loop (no Trainer) of the demo and the benchmarks.
- ``cli`` / ``train``: ``flythinker train`` and ``python -m flythinker.training.train`` (torchrun/accelerate).
- ``toy``: char tokenizer, tiny saved models and toy tasks for tests and smoke runs.
"""

from flythinker.configuration import IGNORE_INDEX
from flythinker.training.collator import FlyThinkerCollator
from flythinker.training.loop import LoopResult, train_loop
from flythinker.training.trainable import (
    apply_lora,
    autocast,
    enable_gradient_checkpointing,
    load_lora_adapters,
    merge_lora,
    merged_state_dict,
    parse_parts,
    resolve_precision,
    save_lora_adapters,
    save_merged,
    set_trainable,
    trainable_parameters,
    trainable_state_dict,
)


def __getattr__(name: str):
    # the Trainer glue imports transformers' Trainer (slow): load it on first use only
    if name in ("FlyThinkerTrainer", "JsonlLogCallback"):
        from flythinker.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'flythinker.training' has no attribute {name!r}")


__all__ = [
    "IGNORE_INDEX", "FlyThinkerCollator", "FlyThinkerTrainer", "JsonlLogCallback", "apply_lora", "autocast",
    "enable_gradient_checkpointing", "load_lora_adapters", "merge_lora", "merged_state_dict", "parse_parts",
    "resolve_precision", "save_lora_adapters", "save_merged", "set_trainable", "trainable_parameters",
    "trainable_state_dict", "LoopResult", "train_loop",
]
