"""HF `Trainer` glue: the model trains unchanged (it returns the loss), plus LoRA-aware saving and a JSONL log.

`Trainer` passes `num_items_in_batch` (the labelled-token count of the whole accumulated, all-process batch) to
`FlyThinkerForCausalLM.forward`, which accepts it (its `**kwargs` makes `model_accepts_loss_kwargs` True): the loss
is then sum / num_items, exact under gradient accumulation and, with `average_tokens_across_devices` (default),
across DDP processes too.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import Trainer, TrainerCallback

from flythinker.training.trainable import lora_parts, merged_state_dict, save_lora_adapters


class FlyThinkerTrainer(Trainer):
    """`Trainer` whose checkpoints always reload with `FlyThinkerForCausalLM.from_pretrained`: with LoRA the
    saved weights have the adapters folded in (adapters alone are also written to `<checkpoint>/lora/<part>`)."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if state_dict is None and lora_parts(model):
            state_dict = merged_state_dict(model)
            if self.args.should_save:
                save_lora_adapters(model, Path(output_dir) / "lora")
        super()._save(output_dir, state_dict=state_dict)


class JsonlLogCallback(TrainerCallback):
    """Append every `Trainer` log entry (loss, learning rate, step, ...) to a JSON-lines file (main process)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as fh:
                fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")
