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

No pickle in a checkpoint: HF Trainer's optimizer.pt / scheduler.pt / scaler.pt / rng_state*.pth / training_args.bin
(torch.save, read back with torch.load) are replaced by safetensors (tensors) + JSON (the rest), each written
atomically; a checkpoint holding only the pickled files is refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from flythinker.training.trainable import lora_parts, merged_state_dict, save_lora_adapters

PARTIAL_SUFFIX = ".partial"
OPTIMIZER_TENSORS, OPTIMIZER_META = "optimizer.safetensors", "optimizer.json"
SCHEDULER_JSON, SCALER_JSON = "scheduler.json", "scaler.json"


class PickleFreeCheckpoints:
    """Trainer mixin (before the `Trainer` class in the bases): checkpoints that always reload with
    `FlyThinkerForCausalLM.from_pretrained` (with flythinker's LoRA the saved weights have the adapters folded in;
    the adapters alone are also written to `<checkpoint>/lora/<part>`, which a resumed LoRA run loads back),
    optimizer / scheduler / RNG state as safetensors + JSON, staged and moved into place atomically, and
    `train(resume_from_checkpoint=True)` from the newest complete one. Used by `FlyThinkerTrainer` and
    `flythinker.rl.FlyThinkerGRPOTrainer`."""

    _staging: Path | None = None

    # ---- saving ----------------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if state_dict is None and lora_parts(model):
            state_dict = merged_state_dict(model)
            if self.args.should_save:
                save_lora_adapters(model, Path(output_dir) / "lora")
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:  # HF pickles its arguments there (torch.save): JSON instead
            from flythinker.hub import atomic_write_bytes

            (Path(output_dir) / "training_args.bin").unlink(missing_ok=True)
            atomic_write_bytes(Path(output_dir) / "training_args.json", self.args.to_json_string().encode())

    def _check_plain(self) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError("FlyThinkerTrainer saves/loads optimizer state as safetensors for "
                                      "single-process and DDP runs only (not DeepSpeed/FSDP)")

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """optimizer.safetensors + optimizer.json and scheduler.json (main process), atomically; no pickle."""
        from flythinker.hub import atomic_write_bytes, atomic_write_json

        self._check_plain()
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        tensors, meta = flatten_optimizer_state(self.optimizer.state_dict())
        atomic_write_bytes(Path(output_dir) / OPTIMIZER_TENSORS, _safetensors_bytes(tensors))
        atomic_write_json(Path(output_dir) / OPTIMIZER_META, _jsonable(meta, OPTIMIZER_META))
        atomic_write_json(Path(output_dir) / SCHEDULER_JSON,
                          _jsonable(self.lr_scheduler.state_dict(), SCHEDULER_JSON))

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            from flythinker.hub import atomic_write_json

            atomic_write_json(Path(output_dir) / SCALER_JSON, _jsonable(scaler.state_dict(), SCALER_JSON))

    def _save_rng_state(self, output_dir: str) -> None:
        """This process's RNG states (python, numpy, torch CPU, every CUDA device) as rng_state[_<rank>]
        .safetensors + .json; every DDP process writes its own (into the one staging folder)."""
        from flythinker.hub import atomic_write_bytes, atomic_write_json

        os.makedirs(output_dir, exist_ok=True)  # a process can get here before the main one made it
        tensors, meta = rng_states()
        stem = Path(output_dir) / self._rng_stem()
        atomic_write_bytes(stem.with_suffix(".safetensors"), _safetensors_bytes(tensors))
        atomic_write_json(stem.with_suffix(".json"), meta)

    def _rng_stem(self) -> str:
        return "rng_state" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}"

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

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Optimizer and scheduler state back from optimizer.safetensors/.json and scheduler.json; CheckpointError
        if they are missing (a pickled optimizer.pt is refused, never read)."""
        from safetensors.torch import load_file

        if checkpoint is None:
            return
        self._check_plain()
        folder = Path(checkpoint)
        _require(folder, OPTIMIZER_TENSORS, OPTIMIZER_META, SCHEDULER_JSON, pickled=("optimizer.pt", "scheduler.pt"))
        meta = json.loads((folder / OPTIMIZER_META).read_text())
        self.optimizer.load_state_dict(unflatten_optimizer_state(load_file(folder / OPTIMIZER_TENSORS), meta))
        self.lr_scheduler.load_state_dict(json.loads((folder / SCHEDULER_JSON).read_text()))

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is None or getattr(self.accelerator, "scaler", None) is None:
            return
        folder = Path(checkpoint)
        if (folder / SCALER_JSON).is_file():
            self.accelerator.scaler.load_state_dict(json.loads((folder / SCALER_JSON).read_text()))
        elif (folder / "scaler.pt").is_file():
            _require(folder, SCALER_JSON, pickled=("scaler.pt",))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """RNG states back from rng_state[_<rank>].safetensors/.json; none saved: a warning (as HF), a pickled
        rng_state*.pth only: CheckpointError."""
        from safetensors.torch import load_file

        if checkpoint is None:
            return
        stem = Path(checkpoint) / self._rng_stem()
        if not stem.with_suffix(".safetensors").is_file():
            if stem.with_suffix(".pth").is_file():
                _require(stem.parent, stem.name + ".safetensors", pickled=(stem.name + ".pth",))
            import warnings

            warnings.warn(f"{checkpoint} has no {stem.name}.safetensors: the resumed run's random numbers may "
                          "differ from an uninterrupted run's", stacklevel=2)
            return
        set_rng_states(load_file(stem.with_suffix(".safetensors")),
                       json.loads(stem.with_suffix(".json").read_text()))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.model if model is None else model
        if lora_parts(model):
            load_lora_checkpoint(model, resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)


class FlyThinkerTrainer(PickleFreeCheckpoints, Trainer):
    """`Trainer` with :class:`PickleFreeCheckpoints` (LoRA-aware, atomic, pickle-free checkpoints and resuming)."""

    def __init__(self, *args: Any, **kwargs: Any):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if getattr(training_args, "use_liger_kernel", False):
            from flythinker.modeling import LIGER_REFUSAL

            raise ValueError(LIGER_REFUSAL)
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, *args, **kwargs):
        """`Trainer.compute_loss`, refusing a batch longer than a model's `max_position_embeddings` (positions
        past it were never trained: a 5.4k-token sequence used to train on a 2048-position SmolLM2)."""
        check_positions(self.accelerator.unwrap_model(model), inputs)
        return super().compute_loss(model, inputs, *args, **kwargs)


# ---- optimizer / RNG state without pickle ---------------------------------------------------------------------
def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """`optimizer.state_dict()` -> (tensors keyed `state.<param_idx>.<name>`, the JSON-able rest: param_groups
    and the non-tensor per-parameter values under "state")."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, dict] = {}
    for idx, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value
            else:
                rest.setdefault(str(idx), {})[name] = value
    order = [str(i) for i in state_dict["state"]]
    return tensors, {"param_groups": state_dict["param_groups"], "state": rest, "order": order}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`flatten_optimizer_state` (parameter indices back to ints)."""
    state: dict[int, dict] = {int(i): dict(meta["state"].get(i, {})) for i in meta["order"]}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_states() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors: torch CPU generator state [5056] uint8, `cuda.<i>` per device; JSON: python `random` and numpy
    MT19937 states)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}
    return tensors, meta


def set_rng_states(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore what :func:`rng_states` returned (CUDA devices that exist here and were saved)."""
    import random

    import numpy as np

    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.random.set_rng_state(tensors["cpu"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda.{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"cuda.{i}"], device=i)


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def _jsonable(obj, what: str):
    """`obj` if `json.dumps` takes it (tuples become lists); TypeError naming `what` otherwise."""
    try:
        return json.loads(json.dumps(obj))
    except TypeError as exc:
        raise TypeError(f"cannot save {what} without pickle: {exc}") from None


def _require(folder: Path, *names: str, pickled: tuple[str, ...]) -> None:
    """CheckpointError if a file of `names` is missing in `folder`, saying so when pickled ones stand instead."""
    from flythinker.checkpoint import CheckpointError

    missing = [n for n in names if not (folder / n).is_file()]
    if not missing:
        return
    found = [n for n in pickled if (folder / n).is_file()]
    if found:
        raise CheckpointError(f"{folder} holds pickled {', '.join(found)} only (no {missing[0]}): flythinker never "
                              "unpickles; resume from a checkpoint written by FlyThinkerTrainer, or start over")
    raise CheckpointError(f"{folder / missing[0]} is missing: not a complete training checkpoint")


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
    lora = model._flythinker_lora
    model = getattr(model, "model", model) if hasattr(model, "reasoner") else model  # a pair: checkpoint names
    adapted = {n.rsplit(".base_layer", 1)[0] for n, _ in model.named_parameters() if ".base_layer." in n}
    plain = {k: v for k, v in state.items() if k.rsplit(".", 1)[0] not in adapted}
    result = model.load_state_dict(plain, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in plain if k in params}  # a tied weight (lm_head = embeddings) is saved once
    missing = [k for k in result.missing_keys
               if ".lora_" not in k and ".base_layer." not in k and id(params.get(k)) not in loaded]
    if missing:
        raise CheckpointError(f"{folder}: missing {len(missing)} tensors, e.g. {missing[:3]}")
    for part, wrapper in lora.items():
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
