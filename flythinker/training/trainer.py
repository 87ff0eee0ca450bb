"""HF `Trainer` glue: the model trains unchanged (it returns the loss), plus LoRA-aware saving and resuming,
atomic checkpoints and a JSONL log that a resumed run continues.

`Trainer` passes `num_items_in_batch` (the labelled-token count of the whole accumulated, all-process batch) to
`FlyThinkerForCausalLM.forward`, which accepts it (its `**kwargs` makes `model_accepts_loss_kwargs` True): the loss
is then sum / num_items, exact under gradient accumulation and, with `average_tokens_across_devices` (default),
across DDP processes too.

Checkpoints (`checkpoint-<step>`) are staged under `.checkpoint-<step>.partial` (one name, so every DDP process
writes its RNG state into the same folder) and moved into place with one `os.replace` once every process is done
(`flythinker.hub.move_into_place`): a run killed while saving leaves no folder that looks complete.
`train(resume_from_checkpoint=True)` resumes the newest *complete* one (`flythinker.checkpoint.latest_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from transformers import Trainer, TrainerCallback

from flythinker.training.trainable import lora_parts, merged_state_dict, save_lora_adapters

PARTIAL_SUFFIX = ".partial"


class FlyThinkerTrainer(Trainer):
    """`Trainer` whose checkpoints always reload with `FlyThinkerForCausalLM.from_pretrained`: with LoRA the
    saved weights have the adapters folded in (adapters alone are also written to `<checkpoint>/lora/<part>`,
    which is what a resumed LoRA run loads back)."""

    _staging: Path | None = None

    def compute_loss(self, model, inputs, *args, **kwargs):
        """`Trainer.compute_loss`, refusing a batch longer than a model's `max_position_embeddings` (positions
        past it were never trained: a 5.4k-token sequence used to train on a 2048-position SmolLM2)."""
        check_positions(self.accelerator.unwrap_model(model), inputs)
        return super().compute_loss(model, inputs, *args, **kwargs)

    # ---- saving ----------------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if state_dict is None and lora_parts(model):
            state_dict = merged_state_dict(model)
            if self.args.should_save:
                save_lora_adapters(model, Path(output_dir) / "lora")
        super()._save(output_dir, state_dict=state_dict)

    def _get_output_dir(self, trial) -> str:
        if self._staging is not None:  # inside _save_checkpoint: HF writes <run_dir>/checkpoint-N -> the stage
            return str(self._staging)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        from flythinker.hub import move_into_place

        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        stage = run_dir / f".{name}{PARTIAL_SUFFIX}"
        if self.args.should_save:
            shutil.rmtree(stage, ignore_errors=True)  # left by a killed run
        self.accelerator.wait_for_everyone()
        self._staging = stage
        try:
            super()._save_checkpoint(model, trial)  # writes stage/checkpoint-N (HF's rotation sees only it)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            move_into_place(stage / name, run_dir / name)
            shutil.rmtree(stage, ignore_errors=True)
            self._rotate_real_checkpoints(run_dir)
        self.accelerator.wait_for_everyone()

    def _rotate_real_checkpoints(self, run_dir: Path) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        if self.state.best_model_checkpoint is not None:  # HF recorded the staged path: point it at the real one
            self.state.best_model_checkpoint = str(run_dir / Path(self.state.best_model_checkpoint).name)
        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)

    # ---- resuming --------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` takes the newest complete `checkpoint-<step>` of
        `args.output_dir` (skipping, with a warning, newer ones that are incomplete), a path is checked first
        (CheckpointError naming what is missing). LoRA runs get their adapters back (`<checkpoint>/lora`)."""
        from flythinker.checkpoint import check_resumable, latest_checkpoint

        if resume_from_checkpoint is True:
            path, skipped = latest_checkpoint(self.args.output_dir)
            for bad, why in skipped:
                import warnings

                warnings.warn(f"not resuming from {bad}: {why}", stacklevel=2)
            resume_from_checkpoint = str(path)
        elif resume_from_checkpoint:
            resume_from_checkpoint = str(check_resumable(resume_from_checkpoint))
        return super().train(resume_from_checkpoint or None, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.model if model is None else model
        if lora_parts(model):
            load_lora_checkpoint(model, resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)


def check_positions(model, inputs: dict) -> None:
    """ValueError if `input_ids` [B, L] or `reasoner_input_ids` [B, L_r] is longer than its model's
    `max_position_embeddings` (cap the collator: `FlyThinkerCollator(max_length=..., reasoner_max_length=...)`)."""
    config = getattr(model, "config", None)
    for key, part in (("input_ids", "generator"), ("reasoner_input_ids", "reasoner")):
        ids = inputs.get(key) if isinstance(inputs, dict) else None
        limit = getattr(getattr(config, part, None), "max_position_embeddings", None)
        if ids is not None and isinstance(limit, int) and ids.shape[-1] > limit:
            cap = "max_length" if part == "generator" else "reasoner_max_length"
            raise ValueError(f"a training batch has {key} of {ids.shape[-1]} tokens, over the {part}'s "
                             f"max_position_embeddings={limit}: cap it (FlyThinkerCollator({cap}={limit}), "
                             f"flythinker train caps it by default)")


def load_lora_checkpoint(model, folder: str | os.PathLike) -> None:
    """Restore a LoRA run's trained state from a checkpoint of :class:`FlyThinkerTrainer` (in place).

    The adapters come from `<folder>/lora/<part>`; every other tensor (a fully trained part or projection) from
    the merged weights. The merged weight of an adapted layer is base + delta, so it is *not* loaded: that
    layer's frozen base stays the one the run started from. Raises CheckpointError if an adapted part has no
    saved adapters or a tensor is missing."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from flythinker.checkpoint import CheckpointError, weight_files

    folder = Path(folder)
    state = {}
    for file in weight_files(folder):
        state.update(load_file(file, device="cpu"))
    adapted = {n.rsplit(".base_layer", 1)[0] for n, _ in model.named_parameters() if ".base_layer." in n}
    plain = {k: v for k, v in state.items() if k.rsplit(".", 1)[0] not in adapted}
    result = model.load_state_dict(plain, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in plain if k in params}  # a tied weight (lm_head = embeddings) is saved once
    missing = [k for k in result.missing_keys
               if ".lora_" not in k and ".base_layer." not in k and id(params.get(k)) not in loaded]
    if missing:
        raise CheckpointError(f"{folder}: missing {len(missing)} tensors, e.g. {missing[:3]}")
    for part, wrapper in model._flythinker_lora.items():
        file = folder / "lora" / part / "adapter_model.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{folder}: no LoRA adapters for the {part} ({file} missing): cannot resume a "
                                  "LoRA run from it")
        out = set_peft_model_state_dict(wrapper, load_file(file, device="cpu"))
        if getattr(out, "unexpected_keys", None):
            raise CheckpointError(f"{file}: adapters do not match this run's LoRA layers "
                                  f"(e.g. {list(out.unexpected_keys)[:3]}; other --lora-r/--lora-targets?)")


class JsonlLogCallback(TrainerCallback):
    """Append every `Trainer` log entry (loss, learning rate, step, ...) to a JSON-lines file (main process).

    A fresh run starts the file empty; a resumed run (global step > 0 at the start) keeps the entries up to the
    checkpoint's step and drops later ones (the run logged them after that checkpoint and will log them again).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from flythinker.hub import atomic_write_bytes

        kept = []
        if state.global_step > 0 and self.path.is_file():
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill mid-append
                    continue
                if isinstance(entry, dict) and entry.get("step", 0) <= state.global_step:
                    kept.append(line + "\n")
        atomic_write_bytes(self.path, "".join(kept).encode())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as fh:
                fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")
